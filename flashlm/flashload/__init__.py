"""flashload: dense models larger than the memory budget, FFN neurons streamed from SSD
("LLM in a flash"): the flash layout (layout.py), sparsity predictors (predictor.py),
neuron windows (window.py), the store that reads and multiplies them (store.py), the
FFN strategy over it (ffn.py) and the windows' share of a budget (plan.py)."""
