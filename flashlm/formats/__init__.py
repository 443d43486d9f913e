"""Model files: GGUF and Hugging Face folders read into TensorRefs (zero-copy views of the
mapped file), the store that hands them to model code, GGUF names of HF tensors, and the
registry of models fetched by name."""
