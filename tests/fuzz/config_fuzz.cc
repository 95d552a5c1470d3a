// Fuzzes the config loader and validator (daemon/config.h): any text an
// operator might put in bufferd.conf.
//
// For every input: ParseConfig never crashes; a refusal is INVALID_ARGUMENT
// whose message starts with the file's name; an accepted config passes
// ValidateConfig; and printed back to textproto it is accepted again (what
// `bufctl config`-style round trips rely on).
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/match.h"
#include "daemon/config.h"
#include "google/protobuf/text_format.h"
#include "tests/fuzz/check.h"

namespace bufferd {
namespace {

// A fixed machine: the same input gives the same answer everywhere.
MachineFacts FuzzMachine() {
  MachineFacts machine;
  machine.mem_total = uint64_t{16} << 30;
  machine.available_hugepages_2m = 64;
  machine.available_hugepages_1g = 1;
  machine.memlock_limit = uint64_t{1} << 30;
  machine.cap_ipc_lock = false;
  machine.group_exists = [](const std::string& name) { return name == "video"; };
  machine.user_exists = [](const std::string& name) { return name == "bufferd"; };
  return machine;
}

}  // namespace
}  // namespace bufferd

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace bufferd;
  static const MachineFacts machine = FuzzMachine();
  const absl::string_view text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<v1::Config> config = ParseConfig(text, "fuzz.conf", machine);
  if (!config.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(config.status()), config.status().ToString());
    FUZZ_CHECK(absl::StartsWith(config.status().message(), "fuzz.conf"),
               "the error names the file: ", config.status().message());
    return 0;
  }
  const absl::Status valid = ValidateConfig(*config);
  FUZZ_CHECK(valid.ok(), "accepted but invalid: ", valid.ToString());
  std::string printed;
  FUZZ_CHECK(google::protobuf::TextFormat::PrintToString(*config, &printed));
  absl::StatusOr<v1::Config> again = ParseConfig(printed, "printed.conf", machine);
  FUZZ_CHECK(again.ok(), "accepted, printed, refused: ", again.status().ToString(), "\n", printed);
  return 0;
}
