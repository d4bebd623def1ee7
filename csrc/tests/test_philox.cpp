// Philox4x32-10 known-answer vectors (Random123 kat_vectors) and the counter layout of the normals.
#include "check.h"
#include "pylandscape/normal.h"
#include "pylandscape/philox.h"

using namespace pylandscape;

int main() {
  struct Kat {
    uint32_t c[4], k[2], want[4];
  } kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& t : kats) {
    const Philox4 r = philox4x32_10(t.c[0], t.c[1], t.c[2], t.c[3], t.k[0], t.k[1]);
    for (int i = 0; i < 4; ++i) EXPECT(r.x[i] == t.want[i]);
  }
  // Normals are finite and bounded by the tail cut sqrt(-2 ln 2^-24) = 5.77.
  float z[4];
  for (uint64_t c = 0; c < 100000; ++c) {
    philox_normal4(0x123456789abcdefULL, 3, c, z);
    for (float v : z) EXPECT(v == v && v > -5.78f && v < 5.78f);
  }
  TEST_MAIN_END();
}
