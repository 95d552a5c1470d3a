#include "base/protocol.h"

#include <sys/random.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "base/client_text.h"

namespace bufferd {

std::string VersionText(absl::string_view program) {
  return absl::StrCat(program, " ", kReleaseVersion, " (protocol v", kProtocolVersion, ")");
}

std::string DefaultSocketDir() {
  if (::geteuid() == 0) return "/run/bufferd";
  const char* runtime = std::getenv("XDG_RUNTIME_DIR");
  if (runtime != nullptr && runtime[0] != '\0') return absl::StrCat(runtime, "/bufferd");
  return absl::StrCat("/tmp/bufferd-", ::geteuid());
}

std::string ControlSocketPath(absl::string_view socket_dir) {
  return absl::StrCat(socket_dir, "/control.sock");
}

std::string FdSocketPath(absl::string_view socket_dir) {
  return absl::StrCat(socket_dir, "/fd.sock");
}

std::string RandomBytes(size_t n) {
  std::string bytes(n, '\0');
  size_t got = 0;
  while (got < n) {
    const ssize_t r = ::getrandom(bytes.data() + got, n - got, 0);
    if (r > 0) got += static_cast<size_t>(r);
  }
  return bytes;
}

std::string FormatSessionCredential(uint64_t session_id, absl::string_view secret) {
  return absl::StrCat(session_id, ":", absl::BytesToHexString(secret));
}

absl::StatusOr<SessionCredential> ParseSessionCredential(absl::string_view text) {
  if (text.empty()) {
    return absl::UnauthenticatedError(absl::StrCat("missing '", kSessionMetadataKey,
                                                   "' metadata; open a session on fd.sock first"));
  }
  const size_t colon = text.find(':');
  SessionCredential credential;
  const absl::string_view hex =
      colon == absl::string_view::npos ? absl::string_view() : text.substr(colon + 1);
  if (colon == absl::string_view::npos ||
      !absl::SimpleAtoi(text.substr(0, colon), &credential.session_id) ||
      hex.size() != 2 * kSessionSecretBytes ||
      !std::all_of(hex.begin(), hex.end(), [](char c) { return absl::ascii_isxdigit(c); })) {
    return absl::UnauthenticatedError(absl::StrCat(
        "malformed '", kSessionMetadataKey, "' metadata; want <session id>:<32 hex digits>"));
  }
  credential.secret = absl::HexStringToBytes(hex);
  return credential;
}

std::string FormatIdList(std::span<const uint64_t> ids) { return absl::StrJoin(ids, ","); }

namespace {

absl::StatusOr<std::vector<uint64_t>> ParseIdList(absl::string_view key, absl::string_view what,
                                                  size_t most, absl::string_view text) {
  std::vector<uint64_t> ids;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    uint64_t id;
    if (!absl::SimpleAtoi(part, &id) || id == 0 || ids.size() == most) {
      return absl::InvalidArgumentError(absl::StrCat("metadata ", key, ": expected up to ", most,
                                                     " comma-separated ", what, ", got ",
                                                     QuoteClientText(text)));
    }
    ids.push_back(id);
  }
  return ids;
}

}  // namespace

absl::StatusOr<std::vector<uint64_t>> ParseReleaseList(absl::string_view text) {
  return ParseIdList(kReleaseMetadataKey, "handle ids", kMaxCarriedReleases, text);
}

absl::StatusOr<std::vector<uint64_t>> ParseRungList(absl::string_view text) {
  return ParseIdList(kRungMetadataKey, "fence ids", kMaxCarriedRung, text);
}

absl::StatusOr<uint64_t> ParseRecordCount(absl::string_view text) {
  uint64_t sent = 0;
  if (!absl::SimpleAtoi(text, &sent)) {
    return absl::InvalidArgumentError(absl::StrCat(
        kRecordsMetadataKey, " metadata must be a decimal count, got ", QuoteClientText(text)));
  }
  return sent;
}

}  // namespace bufferd
