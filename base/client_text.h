// Strings a client controls (heap and buffer names, process names, metadata
// it sent) reach status messages, tables and log lines only through
// QuoteClientText: escaped, so they can never move an operator's cursor, set a
// terminal's title or forge a log line, and cut short, so a 100 KB name is
// never echoed back at length.
#ifndef BUFFERD_BASE_CLIENT_TEXT_H_
#define BUFFERD_BASE_CLIENT_TEXT_H_

#include <sys/types.h>

#include <cstddef>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace bufferd {

// Most bytes of client text a message quotes.
inline constexpr size_t kMaxQuotedBytes = 64;

// Most bytes of text a client may give the daemon to keep (a buffer's or
// fence's name, a timeline, a fence's error message).
inline constexpr size_t kMaxClientTextBytes = 200;

// OK if `text` may be kept and shown as it is: at most kMaxClientTextBytes
// of printable ASCII. INVALID_ARGUMENT naming `field` otherwise (without
// echoing the text).
absl::Status CheckClientText(absl::string_view field, absl::string_view text);

// `text` in single quotes with control characters, quotes, backslashes and
// non-ASCII bytes C-escaped (\x1b, \n, \'); if longer than `max_bytes`, its
// first `max_bytes` bytes followed by "... (N bytes)".
std::string QuoteClientText(absl::string_view text, size_t max_bytes = kMaxQuotedBytes);

// `text` C-escaped as above, without quotes or cut: printable ASCII, for
// short client text the daemon keeps and shows everywhere (a process name
// from /proc/<pid>/comm, at most 15 bytes).
std::string EscapeClientText(absl::string_view text);

// Whether `text` is a plain decimal number: digits only, no sign, no
// space (absl::SimpleAtoi alone takes "+5" and " 5").
bool AllDigits(absl::string_view text);

// /proc/<pid>/comm, escaped as above (the name may hold any byte but NUL):
// how the daemon and bufctl name a process in every table, log line and
// proto (whose string fields must be UTF-8). "" if it cannot be read.
std::string ReadComm(pid_t pid);

}  // namespace bufferd

#endif  // BUFFERD_BASE_CLIENT_TEXT_H_
