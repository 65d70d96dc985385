/* The second translation unit of test_dlpack_layout.c: the same table, with only
 * dino_bridge.h's own DLPack declarations in scope (no dlpack.h). */
#define DLPACK_LAYOUT_OURS
#include "test_dlpack_layout.c"
