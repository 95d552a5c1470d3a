// Fuzzes the gRPC metadata every call carries (base/protocol.h): the session
// credential (checked against a real SessionTable), the carried releases and
// the count of records sent before the call.
//
// Input: three strings (FuzzedDataProvider), and a mutation of a real
// session's credential (a position and a byte). Checked for every input:
// - a credential authenticates only as the session whose id and secret it
//   spells, and a refusal is UNAUTHENTICATED;
// - a release list is accepted only as 1 to kMaxCarriedReleases nonzero
//   handles that survive a format/parse round trip; a refusal is
//   INVALID_ARGUMENT and quotes the text escaped (printable ASCII only);
// - a record count is accepted only as the number it spells;
// both read back against an oracle of their own (std::from_chars).
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "base/protocol.h"
#include "daemon/sessions.h"
#include "tests/fuzz/check.h"

namespace bufferd {
namespace {

struct Live {
  uint64_t id = 0;
  std::string secret;
  std::string credential;
};

class Fixture {
 public:
  Fixture() : sessions_(SessionTable::Options{}) {
    for (int i = 0; i < 3; ++i) {
      auto opened = sessions_.Open(PeerCredentials{.pid = 1, .uid = 1000, .gid = 1000}, "fuzz");
      FUZZ_CHECK(opened.ok(), opened.status().ToString());
      live_.push_back(
          {opened->id, opened->secret, FormatSessionCredential(opened->id, opened->secret)});
    }
  }
  const SessionTable& sessions() const { return sessions_; }
  const std::vector<Live>& live() const { return live_; }

 private:
  SessionTable sessions_;
  std::vector<Live> live_;
};

// An oracle for a decimal number in metadata, independent of the parsers:
// the digits (after ASCII whitespace and one '+', which absl::SimpleAtoi
// allows), read by std::from_chars; nullopt if that is not all there is, or
// it does not fit.
std::optional<uint64_t> Decimal(absl::string_view text) {
  text = absl::StripAsciiWhitespace(text);
  if (!text.empty() && text.front() == '+') text.remove_prefix(1);
  if (text.empty() || !std::all_of(text.begin(), text.end(), absl::ascii_isdigit)) {
    return std::nullopt;
  }
  uint64_t value = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

bool Printable(absl::string_view text) {
  for (char c : text) {
    if (c < 0x20 || c > 0x7e) return false;
  }
  return true;
}

void CheckCredential(const Fixture& fixture, absl::string_view text) {
  const absl::StatusOr<SessionCredential> parsed = ParseSessionCredential(text);
  if (parsed.ok()) {
    FUZZ_CHECK(parsed->secret.size() == kSessionSecretBytes, parsed->secret.size());
  } else {
    FUZZ_CHECK(absl::IsUnauthenticated(parsed.status()), parsed.status().ToString());
  }
  const absl::StatusOr<uint64_t> session = fixture.sessions().Authenticate(text);
  if (!session.ok()) {
    FUZZ_CHECK(absl::IsUnauthenticated(session.status()), session.status().ToString());
    FUZZ_CHECK(Printable(session.status().message()), session.status().message());
    return;
  }
  FUZZ_CHECK(parsed.ok(), "authenticated text that does not parse");
  bool found = false;
  for (const Live& live : fixture.live()) {
    if (live.id != *session) continue;
    found = true;
    FUZZ_CHECK(parsed->session_id == live.id && parsed->secret == live.secret,
               "authenticated as session ", live.id, " without its secret");
  }
  FUZZ_CHECK(found, "authenticated as unknown session ", *session);
}

// A carried id list (releases, rung fences): what the oracle reads as 1 to
// `most` nonzero ids is accepted.
void CheckIdList(absl::StatusOr<std::vector<uint64_t>> (*parse)(absl::string_view), size_t most,
                 absl::string_view text) {
  const absl::StatusOr<std::vector<uint64_t>> handles = parse(text);
  const std::vector<absl::string_view> parts = absl::StrSplit(text, ',');
  const bool valid =
      parts.size() <= most && std::all_of(parts.begin(), parts.end(), [](absl::string_view part) {
        const std::optional<uint64_t> handle = Decimal(part);
        return handle.has_value() && *handle != 0;
      });
  FUZZ_CHECK(handles.ok() == valid, "id list ", valid ? "refused" : "accepted", ": ",
             handles.status().ToString());
  if (!handles.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(handles.status()), handles.status().ToString());
    FUZZ_CHECK(Printable(handles.status().message()), handles.status().message());
    FUZZ_CHECK(handles.status().message().size() < 512, "a long text is quoted cut short");
    return;
  }
  FUZZ_CHECK(!handles->empty() && handles->size() <= most, handles->size());
  for (uint64_t handle : *handles) FUZZ_CHECK(handle != 0);
  // The same list, read by the oracle.
  FUZZ_CHECK(parts.size() == handles->size(), parts.size(), " parts, ", handles->size(),
             " handles");
  for (size_t i = 0; i < parts.size(); ++i) {
    FUZZ_CHECK(Decimal(parts[i]) == (*handles)[i], "handle ", i, " read as ", (*handles)[i]);
  }
  const absl::StatusOr<std::vector<uint64_t>> again = parse(FormatIdList(*handles));
  FUZZ_CHECK(again.ok() && *again == *handles, "id list round trip");
}

void CheckRecordCount(absl::string_view text) {
  const absl::StatusOr<uint64_t> count = ParseRecordCount(text);
  const std::optional<uint64_t> oracle = Decimal(text);
  FUZZ_CHECK(count.ok() == oracle.has_value(), "record count ",
             count.ok() ? "accepted" : "refused");
  if (count.ok()) FUZZ_CHECK(*count == *oracle, "record count read as ", *count);
  if (!count.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(count.status()), count.status().ToString());
    FUZZ_CHECK(Printable(count.status().message()), count.status().message());
    return;
  }
  const absl::StatusOr<uint64_t> again = ParseRecordCount(absl::StrCat(*count));
  FUZZ_CHECK(again.ok() && *again == *count, "record count round trip");
}

}  // namespace
}  // namespace bufferd

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace bufferd;
  static const Fixture* fixture = new Fixture();
  FuzzedDataProvider input(data, size);
  // A real credential with one byte changed (or none: position past its
  // end): right id with a near-miss secret, near-miss id with a right one.
  const Live& live = fixture->live()[input.ConsumeIntegralInRange<size_t>(0, 2)];
  std::string near = live.credential;
  const size_t position = input.ConsumeIntegral<uint8_t>();
  const char byte = input.ConsumeIntegral<char>();
  if (position < near.size()) near[position] = byte;
  CheckCredential(*fixture, near);
  CheckCredential(*fixture, input.ConsumeRandomLengthString(128));
  CheckIdList(ParseReleaseList, kMaxCarriedReleases, input.ConsumeRandomLengthString(8192));
  CheckIdList(ParseRungList, kMaxCarriedRung, input.ConsumeRandomLengthString(2048));
  CheckRecordCount(input.ConsumeRemainingBytesAsString());
  return 0;
}
