// Everything a compiled kernel links with: the Metal shim, the fiber scheduler, the
// synchronising builtins and the launch. Precompiled once per content (build.py).
#pragma once
#include "launch.h"
