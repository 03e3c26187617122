"""Turns off llama.cpp's "extra buffer types" (the CPU repacking of Q4_0/Q4_1/Q8_0/K-quant
weights for AMX and AVX-512) for the Llama objects made after the call: llama-cpp-python 0.3.36
crashed on this project's Xeon with AMX in that path on every quantised file, SmolLM2's own Q4_1
GGUF included; the plain CPU path runs. Imported by the llama.cpp peer scripts beside it."""

import llama_cpp.llama_cpp as lib


def no_repack():
    defaults = lib.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
