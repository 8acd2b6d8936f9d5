// The CPU dispatch table (dispatch.h) and its lookup.
#include "cpu/dispatch.h"

#include <array>
#include <atomic>

namespace segfast::cpu::dispatch {
namespace {

#include "cpu/dispatch_table.inc"

constexpr int8_t kNotForced = -1;
std::array<std::atomic<int8_t>, kChoices> forced = {kNotForced, kNotForced, kNotForced, kNotForced};

bool contains(const Row& row, Choice choice, const ConvKey& key) {
  return row.choice == choice && row.dtype == key.dtype && row.kernel == key.kernel &&
         row.input_grad == key.input_grad && row.in_lo <= key.in_channels && key.in_channels <= row.in_hi &&
         row.out_lo <= key.out_channels && key.out_channels <= row.out_hi && row.pixels_lo <= key.pixels &&
         key.pixels <= row.pixels_hi;
}

}  // namespace

Path choose(Choice choice, const ConvKey& key) {
  const int8_t f = forced[static_cast<int>(choice)].load(std::memory_order_relaxed);
  if (f != kNotForced) return static_cast<Path>(f);
  for (const Row& row : kRows) {
    if (contains(row, choice, key)) return Path::Segfast;
  }
  return Path::Vendor;
}

void force(Choice choice, std::optional<Path> path) {
  forced[static_cast<int>(choice)].store(path ? static_cast<int8_t>(*path) : kNotForced, std::memory_order_relaxed);
}

const char* choice_name(Choice choice) {
  switch (choice) {
    case Choice::DirectConvForward:
      return "direct_conv_forward";
    case Choice::DirectConvWeightGrad:
      return "direct_conv_weight_grad";
    case Choice::ChannelsLastBackward:
      return "channels_last_backward";
    case Choice::ChannelsLastForward:
      return "channels_last_forward";
  }
  return "";
}

}  // namespace segfast::cpu::dispatch
