"""Inference: the engine (vLLM at the edge, behind ``engine_api``), prompt rendering,
sampling and the output parser."""
