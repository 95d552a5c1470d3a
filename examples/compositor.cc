// compositor: shows up to 4 frame_producers side by side in one output
// buffer, taking each producer's newest frame the moment it is ready.
//
//   bazel-bin/examples/compositor --listen /path/compositor.sock --producers 2
//       [--width 1920 --height 1080] [--png out-{n}.png --png-every 60]
//
// Producers connect to --listen (a SOCK_SEQPACKET socket this process
// creates; only its own uid may join) and send one hello: a name and share
// tokens for their acquire timeline and their swapchain (imported here
// read-only). The compositor answers with a token for a release timeline it
// creates for that producer. From then on nothing is sent per frame: the
// acquire timeline's point N says "frame N is in buffer N % buffers"; the
// compositor reads it, then reaches point N of the release timeline, which
// gives every buffer of frames up to N back to the producer.
//
// One event loop polls the listening socket, the producers' sockets and
// each producer's acquire notify fd (Timeline::NotifyFd): a slow or dead
// producer never holds it up. A producer whose session ends (kill -9
// included) is seen through its timeline (OWNER_DIED) or its socket; its
// place turns grey and the others go on. Every second a summary line per
// producer: frames/s, handoff latency (producer ready -> compositor starts
// reading) p50/p99, frames dropped (skipped for a newer one), late (handoff
// over --late-ms) and torn (with --verify: a frame that is not one whole
// frame). On exit, one RESULT line per producer (for scripts and bench/).
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/time/time.h"
#include "base/errno_status.h"
#include "base/frame_format.h"
#include "base/protocol.h"
#include "base/unix_socket.h"
#include "client/client.h"
#include "examples/cli.h"
#include "examples/frames.h"
#include "examples/png_io.h"

namespace {

using bufferd::frames::NowNs;


// Grey: an empty place, or one whose producer left.
constexpr uint32_t kEmpty = 0xff404040;

struct Options {
  std::string socket_dir = bufferd::DefaultSocketDir();
  std::string listen;
  uint32_t producers = 2;
  uint32_t width = 1920;
  uint32_t height = 1080;
  std::string heap;
  std::string usage = "display_frame";
  std::string png;
  uint32_t png_every = 60;
  double seconds = 0;
  bool exit_when_done = false;
  bool no_compose = false;
  bool verify = false;
  double late_ms = 20;
  uint32_t release_deadline_ms = 5000;
  bool quiet = false;
};

struct Counters {
  uint64_t frames = 0;
  uint64_t dropped = 0;
  uint64_t late = 0;
  uint64_t torn = 0;
  uint64_t failed = 0;
  std::vector<uint64_t> handoff_ns;
};

struct Producer {
  uint32_t slot = 0;
  std::string name;
  pid_t pid = 0;
  bufferd::UnixSocket socket;
  std::vector<bufferd::Buffer> buffers;
  std::vector<bufferd::Mapping> maps;
  // Where each buffer's pixels are (in its mapping, or in `staging`).
  std::vector<bufferd::frames::ConstRegion> regions;
  // Per buffer: its pages could be pulled from under a mapping (hugetlb),
  // so it is read with pread (Buffer::Read) into `staging` instead (and
  // its entry in `maps` is empty).
  std::vector<bool> staged;
  std::vector<uint8_t> staging;
  std::optional<bufferd::Timeline> acquire;
  std::optional<bufferd::Timeline> release;
  int notify_fd = -1;
  std::string release_token;
  uint64_t next = 1;
  uint64_t last = 0;
  // When it joined and left (0: still here), for its frames per second.
  uint64_t joined_ns = 0;
  uint64_t left_ns = 0;
  Counters second;
  Counters total;
};

struct Pending {
  bufferd::UnixSocket socket;
  uint64_t expires_ns = 0;
};

class Compositor {
 public:
  explicit Compositor(Options options) : options_(std::move(options)) {}
  // Removes the socket it created, if it is still that one (not one a later
  // compositor made after someone removed ours).
  ~Compositor() {
    struct stat now;
    if (listen_inode_ && ::lstat(options_.listen.c_str(), &now) == 0 &&
        std::pair(now.st_dev, now.st_ino) == *listen_inode_) {
      ::unlink(options_.listen.c_str());
    }
  }

  int Run();

 private:
  absl::Status Start();
  void Accept();
  void Greet(Pending& pending);
  absl::StatusOr<std::unique_ptr<Producer>> Admit(const bufferd::frames::Hello& hello,
                                                  uint32_t slot);
  // Takes every frame of `p` ready now; false once `p` has left.
  bool Service(Producer& p);
  void Read(Producer& p, uint64_t frame);
  void Leave(uint32_t slot, const std::string& why);
  bufferd::frames::Region SlotRegion(uint32_t slot) const;
  void MaybeWritePng();
  void Summary(double at_seconds);
  void Results();

  Options options_;
  std::optional<bufferd::Client> client_;
  bufferd::UnixSocket listener_;
  // The socket made at --listen (none if it could not be looked at).
  std::optional<std::pair<dev_t, ino_t>> listen_inode_;
  std::optional<bufferd::Buffer> output_;
  bufferd::Mapping output_map_;
  bufferd::frames::Region output_region_;
  std::array<std::unique_ptr<Producer>, bufferd::frames::kMaxProducers> slots_;
  std::vector<Pending> pending_;
  // Producers that have left, for the RESULT lines.
  std::vector<std::unique_ptr<Producer>> gone_;
  uint32_t joined_ = 0;
  uint64_t composed_ = 0;
  uint64_t pngs_ = 0;
  uint64_t png_failures_ = 0;
};

void Note(const Options& options, const std::string& line) {
  if (options.quiet) return;
  std::printf("compositor: %s\n", line.c_str());
  std::fflush(stdout);
}

// Why `path` cannot be listened on, if something is there already: a live
// compositor (a connect succeeds), a stale socket, or something else. Never
// removes anything.
absl::Status CheckListenPath(const std::string& path) {
  struct stat there;
  if (::lstat(path.c_str(), &there) != 0) return absl::OkStatus();
  if (!S_ISSOCK(there.st_mode)) {
    return absl::AlreadyExistsError(
        absl::StrCat(path, " exists and is not a socket: give --listen another path"));
  }
  if (bufferd::UnixSocket::SeqPacketListening(path)) {
    return absl::AlreadyExistsError(absl::StrCat("a compositor is listening on ", path));
  }
  return absl::AlreadyExistsError(absl::StrCat(
      path, " is a stale socket (nobody listens on it): remove it, or give --listen another path"));
}

absl::Status Compositor::Start() {
  ASSIGN_OR_RETURN(bufferd::Client client, bufferd::Client::Connect(options_.socket_dir));
  client_.emplace(std::move(client));
  bufferd::AllocateOptions allocate{
      .frame = bufferd::FrameRequest{.width = options_.width * options_.producers,
                                     .height = options_.height,
                                     .fourcc = bufferd::frames::kFourcc},
      .name = "compositor-output"};
  if (!options_.heap.empty()) {
    allocate.heap = options_.heap;
  } else {
    allocate.usage = options_.usage;
  }
  ASSIGN_OR_RETURN(bufferd::Buffer output, client_->Allocate(allocate));
  ASSIGN_OR_RETURN(output_map_, output.Map());
  const bufferd::PlaneLayout plane = output.frame()->planes.at(0);
  output_region_ = {output_map_.data() + plane.offset, plane.stride,
                    options_.width * options_.producers, options_.height};
  bufferd::frames::Fill(output_region_, kEmpty);
  output_.emplace(std::move(output));
  RETURN_IF_ERROR(CheckListenPath(options_.listen));
  // Only this uid may connect (checked again per connection).
  const mode_t old_umask = ::umask(0077);
  absl::StatusOr<bufferd::UnixSocket> listener =
      bufferd::UnixSocket::ListenSeqPacket(options_.listen);
  ::umask(old_umask);
  RETURN_IF_ERROR(listener.status());
  listener_ = *std::move(listener);
  struct stat made;
  if (::lstat(options_.listen.c_str(), &made) == 0) listen_inode_.emplace(made.st_dev, made.st_ino);
  // Accept() takes every waiting connection and stops at EAGAIN.
  if (::fcntl(listener_.fd(), F_SETFL, ::fcntl(listener_.fd(), F_GETFL) | O_NONBLOCK) != 0) {
    return bufferd::ErrnoError("fcntl(O_NONBLOCK)", errno);
  }
  Note(options_,
       absl::StrCat("listening on ", options_.listen, " for ", options_.producers, " producers of ",
                    options_.width, "x", options_.height, "; output ", output_region_.width, "x",
                    output_region_.height, " from heap '", output_->heap(), "'"));
  return absl::OkStatus();
}

void Compositor::Accept() {
  for (;;) {
    absl::StatusOr<bufferd::UnixSocket> socket = listener_.Accept(true);
    if (!socket.ok()) return;
    absl::StatusOr<bufferd::PeerCredentials> peer = socket->GetPeerCredentials();
    if (!peer.ok() || peer->uid != ::geteuid()) {
      (void)socket->Send(bufferd::frames::FormatRefusal("only the compositor's own uid may join"),
                         {}, true);
      Note(options_, peer.ok() ? absl::StrCat("refused a connection of uid ", peer->uid)
                               : "refused a connection whose uid is unknown");
      continue;
    }
    if (pending_.size() >= 16) {
      (void)socket->Send(bufferd::frames::FormatRefusal("too many connections saying nothing"), {},
                         true);
      continue;
    }
    pending_.push_back({*std::move(socket), NowNs() + 2'000'000'000});
  }
}

void Compositor::Greet(Pending& pending) {
  absl::StatusOr<bufferd::UnixSocket::Received> record =
      pending.socket.RecvWithFds(bufferd::frames::kMaxRecord, true, 0);
  if (record.ok() && record->eof) return;
  if (!record.ok()) {
    if (absl::IsUnavailable(record.status())) return;  // nothing after all
    // Too long, or carrying fds (closed unread).
    const std::string why =
        absl::StrCat("not a hello (at most ", bufferd::frames::kMaxRecord, " bytes, no fds)");
    (void)pending.socket.Send(bufferd::frames::FormatRefusal(why), {}, true);
    Note(options_, absl::StrCat("refused a producer: ", why));
    return;
  }
  absl::StatusOr<bufferd::frames::Hello> hello = bufferd::frames::ParseHello(record->bytes);
  std::optional<uint32_t> slot;
  for (uint32_t i = 0; i < options_.producers; ++i) {
    if (slots_[i] == nullptr) {
      slot = i;
      break;
    }
  }
  absl::StatusOr<std::unique_ptr<Producer>> producer =
      !hello.ok() ? absl::StatusOr<std::unique_ptr<Producer>>(hello.status())
      : !slot     ? absl::ResourceExhaustedError(
                        absl::StrCat("every place is taken (", options_.producers,
                                         options_.producers == 1 ? " place)" : " places)"))
              : Admit(*hello, *slot);
  if (!producer.ok()) {
    const std::string why(producer.status().message());
    (void)pending.socket.Send(bufferd::frames::FormatRefusal(why), {}, true);
    Note(options_, absl::StrCat("refused a producer: ", why));
    return;
  }
  (*producer)->socket = std::move(pending.socket);
  if (absl::Status sent = (*producer)->socket.Send(
          bufferd::frames::FormatWelcome({*slot, (*producer)->release_token}), {}, true);
      !sent.ok()) {
    Note(options_, absl::StrCat("producer ", (*producer)->name, " left before its welcome"));
    return;
  }
  if (absl::StatusOr<bufferd::PeerCredentials> peer = (*producer)->socket.GetPeerCredentials();
      peer.ok()) {
    (*producer)->pid = peer->pid;
  }
  Producer& p = **producer;
  p.joined_ns = NowNs();
  slots_[*slot] = *std::move(producer);
  ++joined_;
  Note(options_,
       absl::StrCat("producer ", p.name, " (pid ", p.pid, ") joined in slot ", p.slot, ": ",
                    p.buffers.size(), p.buffers.size() == 1 ? " buffer" : " buffers", " of ",
                    p.regions[0].width, "x", p.regions[0].height, " from heap '",
                    p.buffers[0].heap(), "'",
                    p.staging.empty() ? "" : " (hugetlb: read with pread, never mapped)"));
  if (!Service(p)) return;
}

absl::StatusOr<std::unique_ptr<Producer>> Compositor::Admit(const bufferd::frames::Hello& hello,
                                                            uint32_t slot) {
  auto p = std::make_unique<Producer>();
  p->slot = slot;
  p->name = hello.name;
  std::optional<bufferd::FrameFormat> first;
  for (uint32_t i = 0; i < hello.buffer_tokens.size(); ++i) {
    absl::StatusOr<bufferd::Buffer> buffer = client_->Import(hello.buffer_tokens[i]);
    if (!buffer.ok()) {
      return absl::Status(buffer.status().code(),
                          absl::StrCat("buffer ", i, ": ", buffer.status().message()));
    }
    // What the daemon says the buffer holds, not what the producer says.
    std::optional<bufferd::FrameFormat> frame = buffer->frame();
    if (!frame || frame->fourcc != bufferd::frames::kFourcc || frame->planes.size() != 1 ||
        frame->width < bufferd::frames::kMinWidth) {
      return absl::InvalidArgumentError(
          absl::StrCat("buffer ", i, " is not an ABGR8888 frame at least ",
                       bufferd::frames::kMinWidth, " pixels wide (it is ",
                       frame ? absl::StrCat(frame->width, "x", frame->height, " ",
                                            bufferd::FourccName(frame->fourcc))
                             : "not a frame",
                       ")"));
    }
    // Nothing larger than a place is taken: no producer makes the
    // compositor read (or check) more than it shows.
    if (frame->width > options_.width || frame->height > options_.height) {
      return absl::InvalidArgumentError(absl::StrCat("buffer ", i, " is ", frame->width, "x",
                                                     frame->height, ", larger than a place (",
                                                     options_.width, "x", options_.height, ")"));
    }
    // Every buffer laid out alike (stride included): one staging copy
    // serves them all.
    if (first && *frame != *first) {
      return absl::InvalidArgumentError(
          absl::StrCat("buffer ", i, " is laid out unlike buffer 0 (", frame->width, "x",
                       frame->height, " stride ", frame->planes[0].stride, " vs ", first->width,
                       "x", first->height, " stride ", first->planes[0].stride, ")"));
    }
    first = frame;
    const bufferd::v1::Backing backing = buffer->info().backing();
    const bool staged =
        backing == bufferd::v1::BACKING_HUGETLB_2M || backing == bufferd::v1::BACKING_HUGETLB_1G;
    p->staged.push_back(staged);
    bufferd::Mapping map;
    if (!staged) {
      ASSIGN_OR_RETURN(map, buffer->MapReadOnly());
    }
    p->maps.push_back(std::move(map));
    p->buffers.push_back(*std::move(buffer));
  }
  // Where each buffer's pixels are read: its mapping, or the staging copy
  // Read() fills for a hugetlb buffer (sized once, never moved).
  const bufferd::PlaneLayout plane = first->planes[0];
  if (std::find(p->staged.begin(), p->staged.end(), true) != p->staged.end()) {
    p->staging.resize(first->size);
  }
  for (size_t i = 0; i < p->buffers.size(); ++i) {
    const uint8_t* base = p->staged[i] ? p->staging.data() : p->maps[i].data();
    p->regions.push_back({base + plane.offset, plane.stride, first->width, first->height});
  }
  absl::StatusOr<bufferd::Timeline> acquire = client_->ImportTimeline(hello.acquire_token);
  if (!acquire.ok()) {
    return absl::Status(acquire.status().code(),
                        absl::StrCat("acquire timeline: ", acquire.status().message()));
  }
  p->acquire.emplace(*std::move(acquire));
  ASSIGN_OR_RETURN(p->notify_fd, p->acquire->NotifyFd());
  ASSIGN_OR_RETURN(
      bufferd::Timeline release,
      client_->CreateTimeline({.name = absl::StrCat(hello.name, "-release"),
                               .deadline = absl::Milliseconds(options_.release_deadline_ms)}));
  ASSIGN_OR_RETURN(std::string token, release.Export());
  p->release.emplace(std::move(release));
  p->release_token = std::move(token);
  // Frames reached before we joined: start from the newest.
  p->next = std::max<uint64_t>(1, p->acquire->Query());
  return p;
}

bool Compositor::Service(Producer& p) {
  for (;;) {
    absl::StatusOr<std::optional<bufferd::PointResult>> armed = p.acquire->Arm(p.next);
    if (!armed.ok()) {
      Leave(p.slot, absl::StrCat("its timeline failed: ", armed.status().ToString()));
      return false;
    }
    if (!armed->has_value()) return true;  // not yet: the notify fd says when
    const bufferd::PointResult& result = **armed;
    switch (result.status) {
      case bufferd::v1::FENCE_STATUS_OK:
        Read(p, std::max(p.next, p.acquire->Query()));
        break;
      case bufferd::v1::FENCE_STATUS_ERROR:
        // The producer failed this frame itself: nothing to show.
        ++p.second.failed;
        ++p.total.failed;
        p.next = result.point + 1;
        break;
      case bufferd::v1::FENCE_STATUS_DEADLINE_EXCEEDED:
        // Not ready within the producer's deadline: late, never shown.
        ++p.second.late;
        ++p.total.late;
        p.next = result.point + 1;
        break;
      case bufferd::v1::FENCE_STATUS_CANCELLED:
        Leave(p.slot, "it stopped (its acquire timeline ended: CANCELLED)");
        return false;
      case bufferd::v1::FENCE_STATUS_OWNER_DIED:
        Leave(p.slot, "its session ended (its acquire timeline failed OWNER_DIED)");
        return false;
      default:
        Leave(p.slot, absl::StrCat("its acquire timeline failed ",
                                   bufferd::v1::FenceStatus_Name(result.status)));
        return false;
    }
  }
}

void Compositor::Read(Producer& p, uint64_t frame) {
  const uint64_t start = NowNs();
  const size_t index = frame % p.regions.size();
  const bufferd::frames::ConstRegion& region = p.regions[index];
  if (p.staged[index]) {
    if (absl::Status read = p.buffers[index].Read(0, p.staging); !read.ok()) {
      Note(options_, absl::StrCat("reading ", p.name, "'s frame ", frame, ": ", read.ToString()));
    }
  }
  Counters* counters[] = {&p.second, &p.total};
  std::optional<bufferd::frames::Header> header = bufferd::frames::ReadHeader(region);
  bool torn =
      !header || header->slot != p.slot || header->frame24 != bufferd::frames::Frame24(frame);
  if (!torn && options_.verify) {
    const std::string wrong = bufferd::frames::CheckFrame(region, p.slot);
    if (!wrong.empty()) {
      torn = true;
      if (p.total.torn == 0) Note(options_, absl::StrCat(p.name, "'s frame ", frame, ": ", wrong));
    }
  }
  if (!options_.no_compose) bufferd::frames::CopyPixels(region, SlotRegion(p.slot));
  // Done reading: every buffer of frames up to this one is the producer's.
  if (absl::Status released = p.release->Signal(frame); !released.ok()) {
    Note(options_,
         absl::StrCat("releasing ", p.name, "'s frame ", frame, ": ", released.ToString()));
  }
  for (Counters* c : counters) {
    ++c->frames;
    c->dropped += frame - p.next;
    if (torn) ++c->torn;
    if (header && header->ready_ns != 0 && header->ready_ns <= start) {
      const uint64_t handoff = start - header->ready_ns;
      c->handoff_ns.push_back(handoff);
      if (static_cast<double>(handoff) > options_.late_ms * 1e6) ++c->late;
    }
  }
  p.last = frame;
  p.next = frame + 1;
  ++composed_;
  MaybeWritePng();
}

void Compositor::Leave(uint32_t slot, const std::string& why) {
  std::unique_ptr<Producer> p = std::move(slots_[slot]);
  if (p == nullptr) return;
  Note(options_, absl::StrCat("producer ", p->name, " (slot ", slot, ") left after ",
                              p->total.frames, " frames (last ", p->last, "): ", why));
  p->left_ns = NowNs();
  bufferd::frames::Fill(SlotRegion(slot), kEmpty);
  // Its buffers, mappings and timelines go now; the counters stay.
  p->maps.clear();
  p->regions.clear();
  p->buffers.clear();
  p->acquire.reset();
  p->release.reset();
  p->socket = bufferd::UnixSocket();
  gone_.push_back(std::move(p));
}

bufferd::frames::Region Compositor::SlotRegion(uint32_t slot) const {
  return {output_region_.data + size_t{slot} * options_.width * bufferd::frames::kBytesPerPixel,
          output_region_.stride, options_.width, options_.height};
}

void Compositor::MaybeWritePng() {
  if (options_.png.empty() || composed_ % options_.png_every != 0) return;
  const std::string path = absl::StrReplaceAll(options_.png, {{"{n}", absl::StrCat(pngs_)}});
  const bufferd::frames::ConstRegion picture{output_region_.data, output_region_.stride,
                                             output_region_.width, output_region_.height};
  if (absl::Status written = bufferd::frames::WritePng(path, picture); !written.ok()) {
    if (png_failures_++ == 0) Note(options_, absl::StrCat(written.ToString(), " (said once)"));
    return;
  }
  ++pngs_;
}

std::string Figures(const Counters& c, double seconds) {
  std::vector<uint64_t> samples = c.handoff_ns;
  const uint64_t p50 = bufferd::frames::Quantile(samples, 0.5);
  const uint64_t p99 = bufferd::frames::Quantile(samples, 0.99);
  return absl::StrFormat(
      "%.1f fps, handoff p50 %.1f us p99 %.1f us, dropped %lu, late %lu, torn %lu, failed %lu",
      seconds > 0 ? static_cast<double>(c.frames) / seconds : 0.0, static_cast<double>(p50) / 1e3,
      static_cast<double>(p99) / 1e3, c.dropped, c.late, c.torn, c.failed);
}

void Compositor::Summary(double at_seconds) {
  for (const std::unique_ptr<Producer>& p : slots_) {
    if (p == nullptr) continue;
    Note(options_, absl::StrFormat("%6.1fs %s: %s", at_seconds, p->name, Figures(p->second, 1.0)));
    p->second = Counters();
  }
}

void Compositor::Results() {
  std::vector<const Producer*> all;
  for (const std::unique_ptr<Producer>& p : gone_) all.push_back(p.get());
  for (const std::unique_ptr<Producer>& p : slots_) {
    if (p != nullptr) all.push_back(p.get());
  }
  const uint64_t now = NowNs();
  for (const Producer* p : all) {
    const double seconds =
        static_cast<double>((p->left_ns ? p->left_ns : now) - p->joined_ns) / 1e9;
    std::vector<uint64_t> samples = p->total.handoff_ns;
    const uint64_t p50 = bufferd::frames::Quantile(samples, 0.5);
    const uint64_t p99 = bufferd::frames::Quantile(samples, 0.99);
    std::printf(
        "RESULT slot=%u name=%s frames=%lu last=%lu seconds=%.3f fps=%.1f handoff_p50_ns=%lu "
        "handoff_p99_ns=%lu dropped=%lu late=%lu torn=%lu failed=%lu\n",
        p->slot, p->name.c_str(), p->total.frames, p->last, seconds,
        seconds > 0 ? static_cast<double>(p->total.frames) / seconds : 0.0, p50, p99,
        p->total.dropped, p->total.late, p->total.torn, p->total.failed);
  }
  Note(options_,
       absl::StrCat(composed_, " frames composed, ", pngs_, " PNGs written",
                    png_failures_ != 0 ? absl::StrCat(", ", png_failures_, " failed") : ""));
  std::fflush(stdout);
}

int Compositor::Run() {
  if (absl::Status started = Start(); !started.ok()) {
    std::fprintf(stderr, "compositor: %s\n", started.ToString().c_str());
    return 1;
  }
  const uint64_t start = NowNs();
  const uint64_t end =
      options_.seconds > 0 ? start + static_cast<uint64_t>(options_.seconds * 1e9) : UINT64_MAX;
  uint64_t next_summary = start + 1'000'000'000;
  std::vector<pollfd> fds;
  // What each entry of `fds` is: -1 the listener, -2 - i pending i, else
  // 2 * slot (its notify fd) or 2 * slot + 1 (its socket).
  std::vector<int> what;
  while (!bufferd::examples::StopRequested()) {
    const uint64_t now = NowNs();
    if (now >= end) break;
    if (now >= next_summary) {
      Summary(static_cast<double>(now - start) / 1e9);
      // After a stall, the next summary a second from now, not a burst.
      while (next_summary <= now) next_summary += 1'000'000'000;
    }
    if (options_.exit_when_done && joined_ >= options_.producers &&
        std::all_of(slots_.begin(), slots_.end(), [](const auto& p) { return p == nullptr; })) {
      break;
    }
    std::erase_if(pending_, [&](const Pending& p) { return p.expires_ns <= now; });
    fds.clear();
    what.clear();
    fds.push_back({listener_.fd(), POLLIN, 0});
    what.push_back(-1);
    for (size_t i = 0; i < pending_.size(); ++i) {
      fds.push_back({pending_[i].socket.fd(), POLLIN, 0});
      what.push_back(-2 - static_cast<int>(i));
    }
    for (const std::unique_ptr<Producer>& p : slots_) {
      if (p == nullptr) continue;
      fds.push_back({p->notify_fd, POLLIN, 0});
      what.push_back(static_cast<int>(2 * p->slot));
      fds.push_back({p->socket.fd(), POLLIN, 0});
      what.push_back(static_cast<int>(2 * p->slot + 1));
    }
    const uint64_t wake = std::min(next_summary, end);
    const int timeout_ms = static_cast<int>(std::min<uint64_t>((wake - now) / 1'000'000 + 1, 1000));
    if (::poll(fds.data(), fds.size(), timeout_ms) < 0) continue;  // EINTR: a signal
    std::vector<size_t> greeted;
    for (size_t i = 0; i < fds.size(); ++i) {
      if (fds[i].revents == 0) continue;
      if (what[i] == -1) {
        Accept();
      } else if (what[i] <= -2) {
        const size_t index = static_cast<size_t>(-2 - what[i]);
        Greet(pending_[index]);
        greeted.push_back(index);
      } else {
        const uint32_t slot = static_cast<uint32_t>(what[i] / 2);
        if (slots_[slot] == nullptr) continue;
        if (what[i] % 2 == 0) {
          Service(*slots_[slot]);
        } else {
          // A producer sends nothing after its hello: this is its end.
          absl::StatusOr<bufferd::UnixSocket::Received> record =
              slots_[slot]->socket.RecvWithFds(bufferd::frames::kMaxRecord, true, 0);
          if (record.ok() && !record->eof) {
            Leave(slot, "it sent more than its hello");
          } else if (!record.ok() && absl::IsUnavailable(record.status())) {
            continue;  // nothing after all
          } else if (Service(*slots_[slot])) {
            Leave(slot, "it closed its connection");
          }
        }
      }
    }
    // Every pending connection polled is done with, greeted or not.
    std::sort(greeted.rbegin(), greeted.rend());
    for (size_t index : greeted) pending_.erase(pending_.begin() + static_cast<ptrdiff_t>(index));
  }
  Results();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"compositor: show frame_producers' frames side by side"};
  Options options;
  app.add_option("--socket-dir", options.socket_dir, "bufferd's socket dir")
      ->envname("BUFFERD_SOCKET_DIR")
      ->capture_default_str();
  app.add_option("--listen", options.listen, "the socket producers connect to (created here)")
      ->required();
  app.add_option("--producers", options.producers, "places in the output, side by side")
      ->check(CLI::Range(1u, bufferd::frames::kMaxProducers))
      ->capture_default_str();
  app.add_option("--width", options.width, "width of a place")
      ->check(CLI::Range(bufferd::frames::kMinWidth, 4096u))
      ->capture_default_str();
  app.add_option("--height", options.height, "height of a place")
      ->check(CLI::Range(1u, 4096u))
      ->capture_default_str();
  auto* heap = app.add_option("--heap", options.heap, "heap for the output buffer");
  app.add_option("--usage", options.usage, "usage for the output buffer (when no --heap)")
      ->capture_default_str()
      ->excludes(heap);
  app.add_option("--png", options.png,
                 "write the output here ({n} in the name: numbered, else overwritten)");
  app.add_option("--png-every", options.png_every, "frames composed between PNGs")
      ->check(CLI::Range(1u, 1000000u))
      ->capture_default_str();
  app.add_option("--seconds", options.seconds, "stop after this long (0: never)")
      ->check(bufferd::examples::FiniteRange(0, 1e6));
  app.add_flag("--exit-when-done", options.exit_when_done,
               "exit once --producers producers have joined and all have left");
  app.add_flag("--no-compose", options.no_compose,
               "read only each frame's header (the cost of the handoff)");
  app.add_flag("--verify", options.verify, "check every pixel of every frame (counts torn)");
  app.add_option("--late-ms", options.late_ms, "a handoff slower than this is late")
      ->check(bufferd::examples::FiniteRange(0, 1e6))
      ->capture_default_str();
  app.add_option("--release-deadline-ms", options.release_deadline_ms,
                 "a release a producer waits for longer fails DEADLINE_EXCEEDED")
      ->check(CLI::Range(10u, 300000u))
      ->capture_default_str();
  app.add_flag("--quiet", options.quiet, "print only the RESULT lines");
  if (int code = bufferd::examples::ParseCommandLine(app, argc, argv, "compositor"); code >= 0) {
    return code;
  }
  if (!options.png.empty()) {
    // Fail now, not at the first PNG.
    const size_t slash = options.png.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : options.png.substr(0, slash + 1);
    if (::access(dir.c_str(), W_OK | X_OK) != 0) {
      std::fprintf(stderr, "compositor: --png: cannot write in %s: %s\n", dir.c_str(),
                   std::strerror(errno));
      return 2;
    }
  }
  bufferd::examples::StopOnSignals();
  // A producer gone between our poll and our send is no reason to die.
  ::signal(SIGPIPE, SIG_IGN);
  return Compositor(std::move(options)).Run();
}
