#pragma once
// Shared by the CPU (.cpp) and CUDA (.cu) kernels.
#if defined(__CUDACC__)
#define SEGFAST_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always inlined: the hot loops are multiversioned (below), and GCC does not inline a plain
// inline function into a target clone by itself, which keeps those loops from vectorising
#define SEGFAST_HOST_DEVICE inline __attribute__((always_inline))
#else
#define SEGFAST_HOST_DEVICE inline
#endif

// Hot CPU loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time, so
// one binary vectorises on the machine it runs on without requiring AVX2 to import.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define SEGFAST_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SEGFAST_CPU_MULTIVERSION
#endif
