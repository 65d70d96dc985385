/* The checks the C test clients share: CHECK counts a check and, when `cond` is false,
 * prints where and why and counts a failure; EXPECT_OK checks a call returned BRIDGE_OK.
 * Each client reports `failures` (and `checks`) at its end. */
#ifndef DINO_BRIDGE_TEST_CHECK_H
#define DINO_BRIDGE_TEST_CHECK_H

#include <stdio.h>

static int failures = 0, checks = 0;

#define CHECK(cond, ...)                                         \
    do {                                                         \
        checks++;                                                \
        if (!(cond)) {                                           \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                        \
            fprintf(stderr, "\n");                               \
            failures++;                                          \
        }                                                        \
    } while (0)

#define EXPECT_OK(call)                                                                   \
    do {                                                                                  \
        int32_t got_ = (call);                                                            \
        CHECK(got_ == BRIDGE_OK, "%s: status %d (%s)", #call, got_, bridge_last_error()); \
    } while (0)

#endif
