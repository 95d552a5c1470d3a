// The frame-sharing example end to end: a real daemon, examples/compositor
// and examples/frame_producer processes. The PNGs the compositor writes are
// decoded: every producer's place shows one whole frame (never two mixed:
// the release and acquire timelines keep producer and compositor apart)
// whose number only grows. Killing a producer (-9) leaves the compositor
// composing the other; killing the compositor makes producers exit with a
// clear message. Hostile connections to the compositor are refused with a
// reason and change nothing.
#include "examples/frames.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/unix_socket.h"
#include "client/client.h"
#include "examples/png_io.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/daemon_test.h"

namespace bufferd {
namespace {

using testing::BinaryPath;
using testing::ChildOptions;
using testing::ChildProcess;
using testing::ReadFile;
using ::testing::HasSubstr;

constexpr uint32_t kWidth = 160;
constexpr uint32_t kHeight = 90;
constexpr uint32_t kGrey = 0xff404040;

class FramesTest : public testing::DaemonTest {
 protected:
  void SetUp() override { StartDaemon(); }

  std::string Path(const std::string& name) const { return daemon_->root() + "/" + name; }

  // The compositor, listening once this returns.
  ChildProcess StartCompositor(std::vector<std::string> extra, int producers = 2) {
    std::vector<std::string> args = {
        "--socket-dir", daemon_->socket_dir(),   "--listen", Path("compositor.sock"),
        "--producers",  absl::StrCat(producers), "--width",  absl::StrCat(kWidth),
        "--height",     absl::StrCat(kHeight)};
    args.insert(args.end(), extra.begin(), extra.end());
    absl::StatusOr<ChildProcess> compositor =
        ChildProcess::Spawn(BinaryPath("examples/compositor"), args, {.capture_stdout = true});
    EXPECT_TRUE(compositor.ok()) << compositor.status();
    const std::string first = compositor->ReadLine();
    EXPECT_THAT(first, HasSubstr("listening on")) << first;
    return *std::move(compositor);
  }

  ChildProcess StartProducer(const std::string& name, std::vector<std::string> extra) {
    std::vector<std::string> args = {"--socket-dir", daemon_->socket_dir(),
                                     "--compositor", Path("compositor.sock"),
                                     "--name",       name,
                                     "--width",      absl::StrCat(kWidth),
                                     "--height",     absl::StrCat(kHeight),
                                     "--heap",       "system"};
    args.insert(args.end(), extra.begin(), extra.end());
    absl::StatusOr<ChildProcess> producer = ChildProcess::Spawn(
        BinaryPath("examples/frame_producer"), args, {.output_path = Path(name + ".log")});
    EXPECT_TRUE(producer.ok()) << producer.status();
    return *std::move(producer);
  }

  // Lines of `compositor` until one contains `what` (that line), or "" after
  // `timeout_ms` of silence.
  static std::string ReadUntil(ChildProcess& compositor, const std::string& what,
                               std::vector<std::string>* seen = nullptr, int timeout_ms = 15000) {
    for (;;) {
      std::string line = compositor.ReadLine(timeout_ms);
      if (line.empty()) return "";
      if (seen != nullptr) seen->push_back(line);
      if (absl::StrContains(line, what)) return line;
    }
  }
};

// The value after `key=` in a RESULT line.
uint64_t ResultField(const std::string& line, const std::string& key) {
  uint64_t value = 0;
  EXPECT_TRUE(absl::SimpleAtoi(testing::Field(line, key), &value)) << key << " in " << line;
  return value;
}

// Two producers, a few hundred frames or more each, a PNG every 10 composed frames:
// in every PNG each place holds exactly one frame, and frame numbers only
// grow.
TEST_F(FramesTest, TwoProducersFramesAreWholeAndInOrder) {
  ChildProcess compositor = StartCompositor(
      {"--png", Path("out-{n}.png"), "--png-every", "10", "--exit-when-done", "--verify"});
  // `a` joins first and stays until `b` is done, so each keeps its place
  // for the whole run (a place freed and taken again would restart its
  // frame numbers).
  ChildProcess a = StartProducer("a", {"--fps", "400"});
  std::vector<std::string> lines;
  ASSERT_NE(ReadUntil(compositor, "producer a", &lines), "");
  ChildProcess b = StartProducer("b", {"--frames", "300", "--fps", "0", "--buffers", "2"});
  EXPECT_EQ(b.Wait(), 0) << ReadFile(Path("b.log"));
  // `a` alone for a moment (at 400 frames/s), then it stops too.
  ::usleep(300000);
  a.Kill(SIGTERM);
  EXPECT_EQ(a.Wait(), 0) << ReadFile(Path("a.log"));
  for (std::string line = compositor.ReadLine(); !line.empty(); line = compositor.ReadLine()) {
    lines.push_back(line);
  }
  ASSERT_EQ(compositor.Wait(), 0);
  int results = 0;
  for (const std::string& line : lines) {
    if (!absl::StartsWith(line, "RESULT ")) continue;
    ++results;
    EXPECT_EQ(ResultField(line, "torn"), 0u) << line;
    EXPECT_GE(ResultField(line, "frames"), 20u) << line;
    if (absl::StrContains(line, "name=b ")) {
      EXPECT_EQ(ResultField(line, "slot"), 1u) << line;
      EXPECT_EQ(ResultField(line, "last"), 300u) << line;
    }
  }
  EXPECT_EQ(results, 2);

  // Decode every PNG, in order.
  std::vector<uint64_t> last(2, 0);
  int shown = 0;
  int pngs = 0;
  for (;; ++pngs) {
    const std::string path = Path(absl::StrCat("out-", pngs, ".png"));
    if (!std::filesystem::exists(path)) break;
    absl::StatusOr<frames::Picture> picture = frames::ReadPng(path);
    ASSERT_TRUE(picture.ok()) << picture.status();
    ASSERT_EQ(picture->width, 2 * kWidth);
    ASSERT_EQ(picture->height, kHeight);
    for (uint32_t slot = 0; slot < 2; ++slot) {
      const frames::ConstRegion place{picture->pixels.data() + slot * kWidth * 4,
                                      picture->width * 4, kWidth, kHeight};
      uint32_t first_pixel;
      std::memcpy(&first_pixel, place.data, 4);
      if (first_pixel == kGrey) continue;  // nobody there yet, or gone
      EXPECT_EQ(frames::CheckFrame(place, slot), "") << path << " slot " << slot;
      std::optional<frames::Header> header = frames::ReadHeader(place);
      ASSERT_TRUE(header.has_value()) << path;
      EXPECT_GE(header->frame24, last[slot]) << path << " slot " << slot << " went back";
      last[slot] = header->frame24;
      ++shown;
    }
  }
  EXPECT_GE(pngs, 10);
  EXPECT_GE(shown, 10);
  // Both moved on: the frame shown grew during the run.
  EXPECT_GT(last[0], 1u);
  EXPECT_GT(last[1], 1u);
  ExpectBaseline();
}

// kill -9 of a producer mid-run: the compositor says it left and keeps
// composing the other. Then kill -9 of the compositor: the other producer
// exits 3, naming the compositor's end.
TEST_F(FramesTest, KilledProducerAndKilledCompositor) {
  ChildProcess compositor = StartCompositor({"--seconds", "60"});
  ChildProcess steady = StartProducer("steady", {"--fps", "200", "--seconds", "60"});
  ChildProcess doomed = StartProducer("doomed", {"--fps", "0", "--seconds", "60"});
  ASSERT_NE(ReadUntil(compositor, "producer steady"), "");
  ASSERT_NE(ReadUntil(compositor, "doomed: "), "") << "no summary for the busy producer";
  doomed.Kill(SIGKILL);
  EXPECT_EQ(doomed.Wait(), 128 + SIGKILL);
  const std::string left = ReadUntil(compositor, "producer doomed");
  EXPECT_THAT(left, HasSubstr("left after")) << left;
  // Two more summaries of the steady producer, with frames.
  for (int i = 0; i < 2; ++i) {
    const std::string summary = ReadUntil(compositor, "steady: ");
    ASSERT_NE(summary, "");
    EXPECT_THAT(summary, ::testing::Not(HasSubstr(" 0.0 fps"))) << summary;
    EXPECT_THAT(summary, HasSubstr("torn 0")) << summary;
  }
  compositor.Kill(SIGKILL);
  EXPECT_EQ(compositor.Wait(), 128 + SIGKILL);
  const std::optional<int> code = steady.WaitFor(absl::Seconds(20));
  ASSERT_TRUE(code.has_value()) << "the producer did not notice the compositor's end";
  EXPECT_EQ(*code, 3);
  EXPECT_THAT(ReadFile(Path("steady.log")),
              HasSubstr("the compositor went away (its release timeline ended: "
                        "FENCE_STATUS_OWNER_DIED)"));
  ExpectBaseline();
}

// What a hostile local client can send the compositor: each is refused with
// a reason, and a real producer joins afterwards.
TEST_F(FramesTest, HostileHellosAreRefusedWithAReason) {
  ChildProcess compositor = StartCompositor({"--seconds", "60"}, 1);
  // Only this uid may even connect: nobody else has any permission on the
  // socket (and a connection of another uid is refused again).
  struct stat info;
  ASSERT_EQ(::stat(Path("compositor.sock").c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 077, 0u);
  if (::geteuid() == 0) {
    // Let the stranger through the test's dir, so that only the socket's own
    // mode stands in its way.
    struct stat root;
    ASSERT_EQ(::stat(daemon_->root().c_str(), &root), 0);
    ASSERT_EQ(::chmod(daemon_->root().c_str(), 0711), 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    const std::string path = Path("compositor.sock");
    ASSERT_LT(path.size(), sizeof(address.sun_path));
    std::memcpy(address.sun_path, path.c_str(), path.size() + 1);
    absl::StatusOr<ChildProcess> stranger = ChildProcess::Fork(
        [&] {
          const int fd = ::socket(AF_UNIX, SOCK_SEQPACKET, 0);
          if (fd < 0) return 2;
          if (::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0) {
            return 1;
          }
          return errno == EACCES ? 0 : 3;
        },
        {.uid = 65534, .gid = 65534});
    ASSERT_TRUE(stranger.ok()) << stranger.status();
    EXPECT_EQ(stranger->Wait(), 0) << "another uid could connect to the compositor";
    ASSERT_EQ(::chmod(daemon_->root().c_str(), root.st_mode & 07777), 0);
  }
  // A connection that says nothing is hung up on after 2 s.
  {
    absl::StatusOr<UnixSocket> silent = UnixSocket::ConnectSeqPacket(Path("compositor.sock"));
    ASSERT_TRUE(silent.ok());
    pollfd p{silent->fd(), POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 10000), 1) << "still connected after 10 s";
    absl::StatusOr<UnixSocket::Received> end = silent->RecvWithFds(4096, true, 0);
    ASSERT_TRUE(end.ok()) << end.status();
    EXPECT_TRUE(end->eof);
  }

  // A plain (not frame) buffer and a frame of the wrong format.
  absl::StatusOr<Buffer> plain = client_->Allocate({.heap = "system", .size = 4096});
  ASSERT_TRUE(plain.ok());
  absl::StatusOr<Buffer> nv12 = client_->Allocate(
      {.heap = "system", .frame = FrameRequest{.width = 64, .height = 64, .fourcc = 0x3231564e}});
  ASSERT_TRUE(nv12.ok());
  // Frames of the right format: one larger than a place, two laid out
  // differently (rows 640 and 4096 bytes apart).
  auto frame = [&](uint32_t width, uint32_t alignment) {
    return client_->Allocate({.heap = "system",
                              .frame = FrameRequest{.width = width,
                                                    .height = kHeight,
                                                    .fourcc = frames::kFourcc,
                                                    .stride_alignment = alignment}});
  };
  absl::StatusOr<Buffer> wide = frame(2 * kWidth, 0);
  absl::StatusOr<Buffer> tight = frame(kWidth, 64);
  absl::StatusOr<Buffer> loose = frame(kWidth, 4096);
  ASSERT_TRUE(wide.ok() && tight.ok() && loose.ok());
  auto token = [](absl::StatusOr<std::string> t) { return t.ok() ? *t : std::string("bad"); };

  struct Case {
    std::string record;
    std::string refusal;
  };
  const std::vector<Case> cases = {
      {"GET / HTTP/1.0", "not a hello"},
      {"HELLO 1 x/y t t", "name must be"},
      {"HELLO 1 x 00000000000000000000000000000000 00000000000000000000000000000000", "buffer 0: "},
      {absl::StrCat("HELLO 1 x t ", token(plain->Export(Access::kReadOnly))),
       "buffer 0 is not an ABGR8888 frame"},
      {absl::StrCat("HELLO 1 x t ", token(nv12->Export(Access::kReadOnly))),
       "buffer 0 is not an ABGR8888 frame at least 64 pixels wide (it is 64x64 NV12)"},
      {absl::StrCat("HELLO 1 x t ", token(wide->Export(Access::kReadOnly))),
       "buffer 0 is 320x90, larger than a place (160x90)"},
      {absl::StrCat("HELLO 1 x t ", token(tight->Export(Access::kReadOnly)), " ",
                    token(loose->Export(Access::kReadOnly))),
       "buffer 1 is laid out unlike buffer 0 (160x90 stride 4096 vs 160x90 stride 640)"},
      {std::string(4096, 'H'), "not a hello (at most 2048 bytes, no fds)"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<UnixSocket> socket = UnixSocket::ConnectSeqPacket(Path("compositor.sock"));
    ASSERT_TRUE(socket.ok()) << socket.status();
    ASSERT_TRUE(socket->Send(c.record).ok());
    absl::StatusOr<UnixSocket::Received> answer = socket->RecvWithFds(4096, false, 0);
    ASSERT_TRUE(answer.ok()) << answer.status();
    EXPECT_THAT(answer->bytes, HasSubstr("REFUSED ")) << c.record;
    EXPECT_THAT(answer->bytes, HasSubstr(c.refusal)) << c.record;
  }
  // A good hello whose timeline token is bogus: refused, and the buffers it
  // imported on the way are let go.
  {
    absl::StatusOr<Buffer> frame = client_->Allocate(
        {.heap = "system",
         .frame = FrameRequest{.width = kWidth, .height = kHeight, .fourcc = frames::kFourcc}});
    ASSERT_TRUE(frame.ok());
    absl::StatusOr<UnixSocket> socket = UnixSocket::ConnectSeqPacket(Path("compositor.sock"));
    ASSERT_TRUE(socket.ok());
    ASSERT_TRUE(socket
                    ->Send(absl::StrCat("HELLO 1 x 0123456789abcdef ",
                                        token(frame->Export(Access::kReadOnly))))
                    .ok());
    absl::StatusOr<UnixSocket::Received> answer = socket->RecvWithFds(4096, false, 0);
    ASSERT_TRUE(answer.ok());
    EXPECT_THAT(answer->bytes, HasSubstr("REFUSED acquire timeline: "));
  }
  // The compositor holds nothing of any refused hello: only its output.
  uint32_t handles = 0;
  for (int i = 0; i < 500; ++i) {
    absl::StatusOr<v1::ListClientsResponse> clients = client_->ListClients();
    ASSERT_TRUE(clients.ok()) << clients.status();
    for (const v1::ClientInfo& c : clients->clients()) {
      if (c.pid() == static_cast<uint32_t>(compositor.pid())) handles = c.handles();
    }
    if (handles == 1) break;
    ::usleep(10000);
  }
  EXPECT_EQ(handles, 1u);
  // A real producer still joins, and a second one finds no place.
  ChildProcess producer = StartProducer("real", {"--fps", "100", "--seconds", "60"});
  ASSERT_NE(ReadUntil(compositor, "producer real"), "");
  ChildProcess extra = StartProducer("extra", {"--fps", "100", "--seconds", "1"});
  EXPECT_EQ(extra.Wait(), 1);
  EXPECT_THAT(ReadFile(Path("extra.log")),
              HasSubstr("the compositor refused: every place is taken (1 place)"));
  ASSERT_NE(ReadUntil(compositor, "real: "), "");
  producer.Kill(SIGTERM);
  EXPECT_EQ(producer.Wait(), 0);
  compositor.Kill(SIGTERM);
  std::vector<std::string> lines;
  ReadUntil(compositor, "frames composed", &lines);
  EXPECT_EQ(compositor.Wait(), 0);
  // The compositor removed its socket.
  EXPECT_FALSE(std::filesystem::exists(Path("compositor.sock")));
  for (absl::StatusOr<Buffer>* b : {&plain, &nv12, &wide, &tight, &loose}) {
    *b = absl::CancelledError();
  }
  ExpectBaseline();
}

// --listen never replaces what is there: a live compositor, a stale socket
// and a file are each refused with what they are, and left alone.
TEST_F(FramesTest, ListenPathsAreCheckedNotReplaced) {
  auto start_on = [&](const std::string& path) {
    const std::string log = Path("second.log");
    std::remove(log.c_str());
    absl::StatusOr<ChildProcess> second = ChildProcess::Spawn(
        BinaryPath("examples/compositor"),
        {"--socket-dir", daemon_->socket_dir(), "--listen", path, "--seconds", "30"},
        {.output_path = log});
    EXPECT_TRUE(second.ok()) << second.status();
    EXPECT_EQ(second->Wait(), 1);
    return ReadFile(log);
  };
  ChildProcess compositor = StartCompositor({"--seconds", "60"});
  EXPECT_THAT(start_on(Path("compositor.sock")),
              HasSubstr("a compositor is listening on " + Path("compositor.sock")));
  {
    // A socket whose listener is gone.
    absl::StatusOr<UnixSocket> stale = UnixSocket::ListenSeqPacket(Path("stale.sock"));
    ASSERT_TRUE(stale.ok());
  }
  EXPECT_THAT(start_on(Path("stale.sock")), HasSubstr("is a stale socket (nobody listens on it)"));
  std::ofstream(Path("file")) << "keep me\n";
  EXPECT_THAT(start_on(Path("file")), HasSubstr("exists and is not a socket"));
  EXPECT_EQ(ReadFile(Path("file")), "keep me\n");
  EXPECT_TRUE(std::filesystem::exists(Path("stale.sock")));
  // The first compositor still serves.
  ChildProcess producer = StartProducer("still", {"--fps", "100", "--frames", "20"});
  EXPECT_EQ(producer.Wait(), 0) << ReadFile(Path("still.log"));
  compositor.Kill(SIGTERM);
  EXPECT_EQ(compositor.Wait(), 0);
  ExpectBaseline();
}

}  // namespace
}  // namespace bufferd
