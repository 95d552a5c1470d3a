#include "base/client_text.h"

#include <algorithm>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace bufferd {

std::string EscapeClientText(absl::string_view text) { return absl::CHexEscape(text); }

std::string ReadComm(pid_t pid) {
  // The kernel ends comm with one '\n'.
  std::ifstream in(absl::StrCat("/proc/", pid, "/comm"));
  char buf[64] = {};
  in.read(buf, sizeof(buf) - 1);
  absl::string_view comm(buf, static_cast<size_t>(in.gcount()));
  if (absl::EndsWith(comm, "\n")) comm.remove_suffix(1);
  return EscapeClientText(comm);
}

absl::Status CheckClientText(absl::string_view field, absl::string_view text) {
  if (text.size() > kMaxClientTextBytes) {
    return absl::InvalidArgumentError(absl::StrCat(field, " is ", text.size(), " bytes; at most ",
                                                   kMaxClientTextBytes, " allowed"));
  }
  for (char c : text) {
    if (c < 0x20 || c > 0x7e) {
      return absl::InvalidArgumentError(absl::StrCat(field, " must be printable ASCII"));
    }
  }
  return absl::OkStatus();
}

std::string QuoteClientText(absl::string_view text, size_t max_bytes) {
  if (text.size() <= max_bytes) return absl::StrCat("'", absl::CHexEscape(text), "'");
  return absl::StrCat("'", absl::CHexEscape(text.substr(0, max_bytes)), "...' (", text.size(),
                      " bytes)");
}

bool AllDigits(absl::string_view text) {
  return !text.empty() && std::all_of(text.begin(), text.end(), absl::ascii_isdigit);
}

}  // namespace bufferd
