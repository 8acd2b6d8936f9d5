#pragma once
// Where a CPU kernel chooses between segfast's own path and ATen's (oneDNN), it asks here, and the
// answer comes from one table, dispatch_table.inc, written by benchmarks/update_dispatch.py from
// benchmarks/results/dispatch-cpu-<dtype>.json (`segfast bench --suite dispatch` on the 2-core
// Zen 4 dev machine). A row is a box of shapes in which every measured point ran at least 1.1x
// faster on segfast's path; outside every row, ATen's path runs.
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>

namespace segfast::cpu::dispatch {

enum class Path : int8_t { Vendor, Segfast };

// The choice points and what "Segfast" means at each.
enum class Choice : int8_t {
  DirectConvForward,     // conv2d_act forward of an NCHW caller: the direct kernel (cpu/conv2d_act_direct.h)
                         // instead of oneDNN + the activation pass
  DirectConvWeightGrad,  // conv2d_act backward of an NCHW caller without grad_input: the direct weight /
                         // bias gradients instead of the activation pass + oneDNN's backward
  ChannelsLastBackward,  // conv2d_act backward of an NCHW caller: the activation pass writes grad_z
                         // channels_last and oneDNN's backward runs channels_last, instead of NCHW
  ChannelsLastForward,   // conv2d_act forward of an NCHW caller: oneDNN's convolution channels_last and the
                         // activation pass writing the NCHW output, instead of both in NCHW
};
constexpr int kChoices = 4;

// What a row is keyed on: the layer's dtype, square kernel size (0 for a non-square one: no row
// matches), channels, output pixels of the whole batch (batch x height x width: how much memory a
// call touches decides between the paths more than the image size does), and whether grad_input
// is computed.
struct ConvKey {
  c10::ScalarType dtype;
  int64_t kernel, in_channels, out_channels, pixels;
  bool input_grad;
};

struct Row {
  Choice choice;
  c10::ScalarType dtype;
  int64_t kernel;
  bool input_grad;
  int64_t in_lo, in_hi, out_lo, out_hi, pixels_lo, pixels_hi;  // inclusive
  double slowest_speedup;  // segfast's path over ATen's at the box's least favourable measured point
  int points;              // measured points inside the box
};

// The table's answer, or the path forced by `force` (benchmarks measure both paths through it).
Path choose(Choice choice, const ConvKey& key);

// nullopt: back to the table. Process-wide; for `segfast bench --suite dispatch` and tests.
void force(Choice choice, std::optional<Path> path);

const char* choice_name(Choice choice);

}  // namespace segfast::cpu::dispatch
