// What the extension was compiled against. setup.py generates vpeft_build_info.h (in
// the build directory, on the include path) defining VPEFT_BUILD_INFO_JSON: torch's
// version, torch's CUDA version, whether the CUDA kernels were built and why not.
// The same JSON is embedded in the binary after the marker "VPEFT_BUILD_INFO:" so the
// Python loader can read it from the file *before* loading a library that may have
// been built for another torch (vpeft_kernels/_extension.py).
#pragma once

#if defined(__has_include)
#if __has_include("vpeft_build_info.h")
#include "vpeft_build_info.h"
#endif
#endif

#ifndef VPEFT_BUILD_INFO_JSON
#define VPEFT_BUILD_INFO_JSON "{}"
#endif

namespace vpeft {
__attribute__((used)) static const char kBuildInfoMarker[] = "VPEFT_BUILD_INFO:" VPEFT_BUILD_INFO_JSON;
}  // namespace vpeft
