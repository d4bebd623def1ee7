// Minimal test harness (no gtest dependency): EXPECT(cond) records failures; main returns their count.
#pragma once
#include <cstdio>

static int g_failures = 0;
#define EXPECT(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                          \
    }                                                                        \
  } while (0)
#define TEST_MAIN_END()                                                      \
  std::printf("%s: %d failure(s)\n", __FILE__, g_failures);                 \
  return g_failures == 0 ? 0 : 1
