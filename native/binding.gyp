{
  "targets": [
    {
      "target_name": "medfl_onednn",
      "sources": ["src/addon.cc", "src/conv.cc", "src/elementwise.cc"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc": ["-std=c++17", "-O3", "-march=native", "-fopenmp", "-fexceptions"],
      "ldflags": ["-fopenmp"],
      "defines": ["NAPI_VERSION=8"],
      "libraries": ["-ldnnl", "-lgomp"]
    }
  ]
}
