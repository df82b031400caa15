{
  "targets": [
    {
      "target_name": "medfl_onednn",
      "sources": ["src/addon.cc", "src/conv.cc", "src/elementwise.cc", "src/loss.cc", "src/robust.cc", "src/norm.cc", "src/fold.cc", "src/gaussian.cc", "src/window_blend.cc"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
      # -fno-trapping-math: no code here reads floating-point exception flags, and without it GCC keeps every
      # masked loop (ReLU backward, the norms' fused ReLU masks, pooling) scalar, since if-converting a select
      # around a multiply or add could raise a flag the source would not. Values are unchanged (IEEE arithmetic,
      # no reassociation: that would be -ffast-math).
      "cflags_cc": ["-std=c++17", "-O3", "-fopenmp", "-fexceptions", "-fno-trapping-math"],
      "ldflags": ["-fopenmp"],
      "defines": ["NAPI_VERSION=8"],
      "libraries": ["-ldnnl", "-lgomp"],
      "conditions": [
        # Portable, not -march=native: node_modules gets copied to other hosts, and an addon built for a newer
        # CPU dies there with SIGILL. x86-64-v2 (SSE4.2, POPCNT; RHEL 9's own baseline) runs on every x86-64
        # server since 2009; oneDNN picks AVX2/AVX-512 kernels at run time itself. The loader checks these
        # flags before loading (shared/engine/onednn-kernels.ts, X86_64_V2_FLAGS).
        ["target_arch=='x64'", { "cflags_cc": ["-march=x86-64-v2", "-mtune=generic"] }]
      ]
    }
  ]
}
