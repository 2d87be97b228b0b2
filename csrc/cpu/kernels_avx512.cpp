// CPU kernels compiled for the AVX512 CPU capability, as the extension module
// lape_kernels._cpu_avx512 (setup.py gives this file its ISA flags). lape_kernels._C imports the
// best module the machine supports; importing one registers its kernels for the CPU key.
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels.h"

LAPE_KERNELS_REGISTER_CPU()
LAPE_KERNELS_PYINIT(_cpu_avx512)
