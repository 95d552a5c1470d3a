// The wire protocol's constants and formats, in one place for both sides:
// the socket dir's layout, the fd.sock protocol version and record limit,
// and the gRPC metadata every call carries (see buffer.proto and
// fd_channel.proto for the messages themselves).
//
// Pure functions; thread-safe.
#ifndef BUFFERD_BASE_PROTOCOL_H_
#define BUFFERD_BASE_PROTOCOL_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace bufferd {

// Socket-dir layout: $XDG_RUNTIME_DIR/bufferd, or /run/bufferd for root, or
// /tmp/bufferd-<uid>; control.sock (gRPC) and fd.sock (SEQPACKET) in it.
std::string DefaultSocketDir();
std::string ControlSocketPath(absl::string_view socket_dir);
std::string FdSocketPath(absl::string_view socket_dir);

// fd.sock: the Hello's protocol_version, and the largest record either side
// sends or accepts (one FdChannelMessage per record).
inline constexpr uint32_t kProtocolVersion = 3;

// The release, the one place it is written: `bufferd --version` and
// `bufctl --version` print VersionText ("bufferd 0.9 (protocol v3)").
inline constexpr char kReleaseVersion[] = "0.9";
std::string VersionText(absl::string_view program);
inline constexpr size_t kMaxRecordBytes = 4096;
// FdUploads a session may leave unclaimed: one more drops the oldest. The
// client library never has more in flight.
inline constexpr size_t kMaxUnclaimedUploads = 16;

// gRPC metadata: every call carries the session credential under
// kSessionMetadataKey; a call may carry releases of handles the client
// dropped under kReleaseMetadataKey (at most kMaxCarriedReleases).
inline constexpr char kSessionMetadataKey[] = "bufferd-session";
inline constexpr char kReleaseMetadataKey[] = "bufferd-release";
// How many records the client had sent on fd.sock when it made the call: the
// daemon applies them all before the call runs (a one-way fence signal, an
// FdUpload the call names).
inline constexpr char kRecordsMetadataKey[] = "bufferd-records";
inline constexpr size_t kMaxCarriedReleases = 256;
// Fences the client signalled OK by their doorbell alone, with no record
// (CreateFenceResponse.doorbell_watched): a call carries their ids until one
// succeeds, and the daemon reads each one's word in the fence page before the
// call runs, so the signal is applied before it as a record's would be.
inline constexpr char kRungMetadataKey[] = "bufferd-rung";
inline constexpr size_t kMaxCarriedRung = 64;

// Bytes of a session secret (random, sent once in the Hello).
inline constexpr size_t kSessionSecretBytes = 16;

// `n` bytes from the kernel's CSPRNG (getrandom), for session secrets and
// share tokens.
std::string RandomBytes(size_t n);

// A session credential: "<session id>:<secret as 32 lowercase hex digits>".
struct SessionCredential {
  uint64_t session_id = 0;
  // kSessionSecretBytes raw bytes.
  std::string secret;
};
std::string FormatSessionCredential(uint64_t session_id, absl::string_view secret);
// UNAUTHENTICATED naming what is wrong (missing, malformed).
absl::StatusOr<SessionCredential> ParseSessionCredential(absl::string_view text);

// Carried ids (kReleaseMetadataKey's handles, kRungMetadataKey's fences):
// comma-separated, none 0, at most kMaxCarriedReleases (kMaxCarriedRung).
// INVALID_ARGUMENT naming the key and the text (escaped) otherwise.
std::string FormatIdList(std::span<const uint64_t> ids);
absl::StatusOr<std::vector<uint64_t>> ParseReleaseList(absl::string_view text);
absl::StatusOr<std::vector<uint64_t>> ParseRungList(absl::string_view text);

// The count of records a call says were sent before it (kRecordsMetadataKey):
// a decimal number. INVALID_ARGUMENT otherwise.
absl::StatusOr<uint64_t> ParseRecordCount(absl::string_view text);

}  // namespace bufferd

#endif  // BUFFERD_BASE_PROTOCOL_H_
