"""The machinery under the loop: the run folder and its files, start-up checks, what a run
prints, statistics, torchrun, CPU kernels, the embedded model's conversion, Hugging Face
loading checks and the optional vLLM sampler. The idea is in the root files (sppo.py, model.py, ...)."""
