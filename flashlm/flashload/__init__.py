"""flashload: dense models larger than the memory budget, FFN neurons streamed from SSD
("LLM in a flash"). So far: the I/O engine (io.py) and the disk probe (probe.py)."""
