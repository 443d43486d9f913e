"""Mixture-of-experts FFNs: routing as llama.cpp does it, and the experts' weights from
the mapped file (all resident) or streamed through a byte-budgeted cache."""
