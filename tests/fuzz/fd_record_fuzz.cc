// Fuzzes fd.sock: what a client sends the daemon on its record channel,
// into the real thing. A real daemon (Daemon::Start, in this process, on a
// temporary socket dir) serves; each input opens a session on its fd.sock,
// gets two buffers and two fences through the real gRPC services, then
// sends up to 48 records the input describes, in order:
// - bytes as they come (garbage, truncated, up to 2x the record limit);
// - well-formed records of each type a client may send (releases, fence
//   signals with any status and message, forgets, uploads) naming its own
//   handles and fences, another session's, or any id;
// - records of the types only the daemon sends (hello, deliveries, refused);
// - records carrying fds: none, one (a buffer's memfd, a pipe, an eventfd, a
//   directory) or many (up to 80);
// - calls that say how many records came before them (bufferd-records), so
//   the records are applied by the call's own thread: GetBuffer, and an
//   Export naming an upload;
// - bursts of 17 to 40 uploads nobody claims, after which the daemon must
//   hold at most 16 of them.
// Then it closes the connection. Checked for every input: every call ends
// in a status a client can act on (never INTERNAL or UNKNOWN); once the
// session has ended, the daemon holds nothing of it (no buffer, handle,
// token, fence or session) and this process has exactly the fds it had
// before (so the daemon kept none of the fds sent to it); a bystander
// session's buffer is still there and intact.
#include <fcntl.h>
#include <fuzzer/FuzzedDataProvider.h>
#include <grpcpp/grpcpp.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "base/fd_count.h"
#include "base/protocol.h"
#include "base/unique_fd.h"
#include "base/unix_socket.h"
#include "bufferd/v1/buffer.grpc.pb.h"
#include "bufferd/v1/debug.grpc.pb.h"
#include "bufferd/v1/fd_channel.pb.h"
#include "bufferd/v1/fence.grpc.pb.h"
#include "daemon/config.h"
#include "daemon/daemon.h"
#include "testing/eventually.h"
#include "tests/fuzz/check.h"

namespace bufferd {
namespace {

constexpr uint64_t kBufferBytes = 8192;
constexpr char kPattern[] = "bystander's frame";

// Calls end in a status a client can act on; INTERNAL or UNKNOWN would be a
// daemon bug showing through.
void CheckCallStatus(const grpc::Status& status, absl::string_view call) {
  FUZZ_CHECK(status.error_code() != grpc::StatusCode::INTERNAL &&
                 status.error_code() != grpc::StatusCode::UNKNOWN,
             call, ": ", status.error_code(), " ", status.error_message());
}

// A session opened on fd.sock by hand, with raw stubs carrying its
// credential.
struct Session {
  UnixSocket socket;
  uint64_t id = 0;
  std::string credential;
  // Records sent since it connected (for bufferd-records).
  uint64_t sent = 0;

  std::unique_ptr<grpc::ClientContext> Context(bool with_records) const {
    auto context = std::make_unique<grpc::ClientContext>();
    context->AddMetadata(kSessionMetadataKey, credential);
    if (with_records) context->AddMetadata(kRecordsMetadataKey, absl::StrCat(sent));
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    return context;
  }
};

// How often a check that waits asks again: every millisecond (what the
// daemon lets go of, it lets go of on its loop or its reaper's thread, a
// moment after the call or close that caused it).
constexpr absl::Duration kPollEvery = absl::Milliseconds(1);

// One record from the daemon within 10 s (the fd of a delivery).
UniqueFd ReceiveDelivery(const UnixSocket& socket) {
  pollfd ready{socket.fd(), POLLIN, 0};
  FUZZ_CHECK(::poll(&ready, 1, 10000) == 1, "no delivery within 10 s");
  absl::StatusOr<UnixSocket::Received> received = socket.RecvWithFds();
  FUZZ_CHECK(received.ok() && received->fds.size() == 1, "a delivery with one fd");
  return std::move(received->fds[0]);
}

class World {
 public:
  World() {
    // Under $TMPDIR (tools/fuzz gives each run its own, and removes it),
    // else /tmp; removed at exit, but not after a failed check. (Not under
    // Bazel's TEST_TMPDIR: too long a path for a unix socket.)
    const char* tmp = std::getenv("TMPDIR");
    std::string dir =
        absl::StrCat(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp", "/bufferd-fuzz-XXXXXX");
    FUZZ_CHECK(::mkdtemp(dir.data()) != nullptr, "mkdtemp ", dir);
    dir_ = dir;
    absl::StatusOr<v1::Config> config = ParseConfig(
        R"pb(
          heaps { name: "system" type: HEAP_TYPE_SYSTEM capacity_bytes: 67108864 }
          log_level: "off"
          default_fence_deadline_ms: 20000
        )pb",
        "fuzz.conf", MachineFacts{});
    FUZZ_CHECK(config.ok(), config.status().ToString());
    absl::StatusOr<std::unique_ptr<Daemon>> daemon = Daemon::Start(*config, dir_);
    FUZZ_CHECK(daemon.ok(), daemon.status().ToString());
    daemon_ = *std::move(daemon);
    auto channel = grpc::CreateChannel(absl::StrCat("unix:", ControlSocketPath(dir_)),
                                       grpc::InsecureChannelCredentials());
    allocator_ = v1::Allocator::NewStub(channel);
    fence_ = v1::Fence::NewStub(channel);
    debug_ = v1::Debug::NewStub(channel);
    // The bystander: a session that stays, with a buffer whose bytes must
    // never change.
    bystander_ = Open();
    bystander_handle_ = Allocate(bystander_, &bystander_fd_);
    FUZZ_CHECK(bystander_handle_ != 0, "the bystander's buffer");
    void* map =
        ::mmap(nullptr, kBufferBytes, PROT_READ | PROT_WRITE, MAP_SHARED, bystander_fd_.get(), 0);
    FUZZ_CHECK(map != MAP_FAILED);
    std::memcpy(map, kPattern, sizeof(kPattern));
    ::munmap(map, kBufferBytes);
  }

  Session Open() {
    absl::StatusOr<UnixSocket> socket = UnixSocket::ConnectSeqPacket(FdSocketPath(dir_));
    FUZZ_CHECK(socket.ok(), socket.status().ToString());
    absl::StatusOr<UnixSocket::Received> hello = socket->RecvWithFds();
    v1::FdChannelMessage message;
    FUZZ_CHECK(hello.ok() && message.ParseFromString(hello->bytes) && message.has_hello(),
               "no hello");
    Session session;
    session.socket = *std::move(socket);
    session.id = message.hello().session_id();
    session.credential = FormatSessionCredential(session.id, message.hello().secret());
    return session;
  }

  // A buffer for `session`: its handle (0 if refused) and, in `fd`, its fd.
  uint64_t Allocate(const Session& session, UniqueFd* fd) {
    v1::AllocateRequest request;
    request.set_heap("system");
    request.set_size(kBufferBytes);
    request.set_name("fuzz");
    v1::AllocateResponse response;
    const grpc::Status status =
        allocator_->Allocate(session.Context(false).get(), request, &response);
    CheckCallStatus(status, "Allocate");
    if (!status.ok()) return 0;
    *fd = ReceiveDelivery(session.socket);
    return response.handle();
  }

  uint64_t CreateFence(const Session& session) {
    v1::CreateFenceRequest request;
    request.set_name("fuzz");
    v1::CreateFenceResponse response;
    const grpc::Status status =
        fence_->CreateFence(session.Context(false).get(), request, &response);
    CheckCallStatus(status, "CreateFence");
    return status.ok() ? response.fence().fence_id() : 0;
  }

  // Waits (up to 10 s) until the daemon holds nothing but the bystander's,
  // then checks it.
  void CheckOnlyBystanderLeft() {
    v1::ListHeapsResponse heaps;
    v1::ListClientsResponse clients;
    v1::ListFencesResponse fences;
    grpc::Status status;
    auto settled = [&] {
      // Debug calls are made in a session too: the bystander's.
      auto a = bystander_.Context(false);
      auto b = bystander_.Context(false);
      auto c = bystander_.Context(false);
      heaps.Clear();
      clients.Clear();
      fences.Clear();
      for (const grpc::Status& call :
           {debug_->ListHeaps(a.get(), v1::ListHeapsRequest(), &heaps),
            debug_->ListClients(b.get(), v1::ListClientsRequest(), &clients),
            debug_->ListFences(c.get(), v1::ListFencesRequest(), &fences)}) {
        if (!call.ok()) {
          status = call;
          return false;
        }
      }
      return heaps.live_buffers() == 1 && heaps.live_handles() == 1 &&
             heaps.pending_tokens() == 0 && clients.clients_size() == 1 &&
             fences.fences_size() == 0 && heaps.heaps(0).used() == kBufferBytes;
    };
    FUZZ_CHECK(testing::Eventually(settled, absl::Seconds(10), kPollEvery), status.error_message(),
               "; left after the session ended: ", heaps.live_buffers(), " buffers, ",
               heaps.live_handles(), " handles, ", heaps.pending_tokens(), " tokens, ",
               clients.clients_size(), " sessions, ", fences.fences_size(), " fences, ",
               heaps.heaps_size() > 0 ? heaps.heaps(0).used() : 0, " bytes used");
    FUZZ_CHECK(clients.clients(0).session_id() == bystander_.id, "the bystander is gone");
    v1::GetBufferRequest request;
    request.set_handle(bystander_handle_);
    v1::GetBufferResponse response;
    const grpc::Status got =
        allocator_->GetBuffer(bystander_.Context(false).get(), request, &response);
    FUZZ_CHECK(got.ok(), "the bystander's buffer: ", got.error_message());
    char bytes[sizeof(kPattern)] = {};
    FUZZ_CHECK(::pread(bystander_fd_.get(), bytes, sizeof(bytes), 0) == sizeof(bytes));
    FUZZ_CHECK(std::memcmp(bytes, kPattern, sizeof(kPattern)) == 0, "the bystander's bytes");
  }

  // fds the daemon holds as uploads and fences (one budget use).
  uint64_t UploadAndFenceFds() {
    v1::ListHeapsResponse heaps;
    const grpc::Status status =
        debug_->ListHeaps(bystander_.Context(false).get(), v1::ListHeapsRequest(), &heaps);
    FUZZ_CHECK(status.ok(), "ListHeaps: ", status.error_message());
    return heaps.fds().fences();
  }

  const std::string& dir() const { return dir_; }
  uint64_t bystander_handle() const { return bystander_handle_; }
  uint64_t bystander_id() const { return bystander_.id; }
  v1::Allocator::Stub& allocator() { return *allocator_; }

 private:
  std::string dir_;
  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<v1::Allocator::Stub> allocator_;
  std::unique_ptr<v1::Fence::Stub> fence_;
  std::unique_ptr<v1::Debug::Stub> debug_;
  Session bystander_;
  uint64_t bystander_handle_ = 0;
  UniqueFd bystander_fd_;
};

class Run {
 public:
  Run(World& world, FuzzedDataProvider& input) : world_(world), input_(input) {}

  void Go() {
    session_ = world_.Open();
    for (int i = 0; i < 2; ++i) {
      UniqueFd fd;
      const uint64_t handle = world_.Allocate(session_, &fd);
      if (handle != 0) {
        handles_.push_back(handle);
        buffer_fds_.push_back(std::move(fd));
      }
      const uint64_t fence = world_.CreateFence(session_);
      if (fence != 0) fences_.push_back(fence);
    }
    for (int step = 0; step < 48 && input_.remaining_bytes() > 0; ++step) Step();
    session_.socket = UnixSocket();
    buffer_fds_.clear();
  }

 private:
  uint64_t PickHandle() {
    switch (input_.ConsumeIntegralInRange(0, 5)) {
      case 0:
        return world_.bystander_handle();  // another session's
      case 1:
        return input_.ConsumeIntegral<uint64_t>();
      default:
        return handles_.empty()
                   ? 0
                   : handles_[input_.ConsumeIntegralInRange<size_t>(0, 1) % handles_.size()];
    }
  }
  uint64_t PickFence() {
    if (fences_.empty() || input_.ConsumeIntegralInRange(0, 4) == 0) {
      return input_.ConsumeIntegralInRange<uint64_t>(0, 1 << 20);
    }
    return fences_[input_.ConsumeIntegralInRange<size_t>(0, fences_.size() - 1)];
  }

  // The fds a record carries.
  std::vector<UniqueFd> PickFds() {
    std::vector<UniqueFd> fds;
    const int count = input_.ConsumeIntegralInRange(0, 7) == 0
                          ? input_.ConsumeIntegralInRange(2, 80)
                          : input_.ConsumeIntegralInRange(0, 1);
    for (int i = 0; i < count; ++i) {
      switch (input_.ConsumeIntegralInRange(0, 3)) {
        case 0:
          if (!buffer_fds_.empty()) {
            fds.emplace_back(::fcntl(
                buffer_fds_[input_.ConsumeIntegralInRange<size_t>(0, 1) % buffer_fds_.size()].get(),
                F_DUPFD_CLOEXEC, 0));
            break;
          }
          [[fallthrough]];
        case 1:
          fds.emplace_back(ReadEndOfClosedPipe());
          break;
        case 2:
          fds.emplace_back(::eventfd(0, EFD_CLOEXEC));
          break;
        default:
          fds.emplace_back(::open("/tmp", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
          break;
      }
    }
    return fds;
  }

  void Send(const std::string& bytes, const std::vector<UniqueFd>& fds = {}) {
    std::vector<int> raw;
    for (const UniqueFd& fd : fds) raw.push_back(fd.get());
    // Refused once the daemon has ended the session (EPIPE): nothing to
    // check but what is left afterwards.
    if (session_.socket.Send(bytes, raw, /*dont_wait=*/true).ok()) ++session_.sent;
  }

  void Step() {
    v1::FdChannelMessage message;
    switch (input_.ConsumeIntegralInRange(0, 12)) {
      case 12: {  // a burst of uploads nobody claims: the daemon keeps the newest 16
        const int count = input_.ConsumeIntegralInRange<int>(kMaxUnclaimedUploads + 1, 40);
        const uint64_t first = input_.ConsumeIntegralInRange<uint64_t>(1, 1000);
        for (int i = 0; i < count; ++i) {
          message.mutable_upload()->set_upload_id(first + i);
          std::vector<UniqueFd> fds;
          if (!buffer_fds_.empty() && i % 2 == 0) {
            fds.emplace_back(::fcntl(buffer_fds_[0].get(), F_DUPFD_CLOEXEC, 0));
          } else {
            fds.emplace_back(::eventfd(0, EFD_CLOEXEC));
          }
          Send(message.SerializeAsString(), fds);
        }
        // A call that must see them applied first.
        v1::GetBufferRequest request;
        request.set_handle(PickHandle());
        v1::GetBufferResponse response;
        const grpc::Status status =
            world_.allocator().GetBuffer(session_.Context(true).get(), request, &response);
        if (status.error_code() == grpc::StatusCode::UNAUTHENTICATED) {
          return;  // an earlier record ended the session
        }
        CheckCallStatus(status, "GetBuffer");
        // The uploads pushed out are closed on the reaper's thread, a
        // moment later.
        uint64_t kept = 0;
        FUZZ_CHECK(testing::Eventually(
                       [&] {
                         kept = world_.UploadAndFenceFds();
                         return kept <= kMaxUnclaimedUploads;
                       },
                       absl::Seconds(10), kPollEvery),
                   "the daemon keeps ", kept, " uploads and fence fds after ", count, " uploads");
        return;
      }
      case 0: {  // bytes as they come
        const size_t size = input_.ConsumeIntegralInRange<size_t>(0, 2 * kMaxRecordBytes);
        Send(input_.ConsumeBytesAsString(size), PickFds());
        return;
      }
      case 1:
      case 2:
        message.mutable_release()->set_handle(PickHandle());
        break;
      case 3:
      case 4: {
        v1::FenceSignal* signal = message.mutable_signal();
        signal->set_fence_id(PickFence());
        signal->set_status(input_.ConsumeIntegralInRange(0, 4) == 0
                               ? input_.ConsumeIntegral<int32_t>()
                               : input_.ConsumeIntegralInRange(0, 4));
        signal->set_message(input_.ConsumeRandomLengthString(600));
        break;
      }
      case 5:
        for (int i = input_.ConsumeIntegralInRange(0, 300); i > 0; --i) {
          message.mutable_forget()->add_fence_ids(PickFence());
        }
        if (!message.has_forget()) message.mutable_forget();
        break;
      case 6:
        for (int i = input_.ConsumeIntegralInRange(0, 8); i > 0; --i) {
          message.mutable_forget_timelines()->add_timeline_ids(input_.ConsumeIntegral<uint64_t>());
        }
        if (!message.has_forget_timelines()) message.mutable_forget_timelines();
        break;
      case 7:
      case 8: {
        message.mutable_upload()->set_upload_id(input_.ConsumeIntegralInRange(0, 3) == 0
                                                    ? input_.ConsumeIntegral<uint64_t>()
                                                    : input_.ConsumeIntegralInRange(0, 20));
        std::string bytes = message.SerializeAsString();
        Send(bytes, PickFds());
        return;
      }
      case 9:  // what only the daemon sends
        switch (input_.ConsumeIntegralInRange(0, 3)) {
          case 0:
            message.mutable_hello()->set_session_id(world_.bystander_id());
            message.mutable_hello()->set_secret(input_.ConsumeRandomLengthString(32));
            break;
          case 1:
            message.mutable_delivery()->set_transfer_id(input_.ConsumeIntegral<uint64_t>());
            break;
          case 2:
            message.mutable_refused()->set_message(input_.ConsumeRandomLengthString(64));
            break;
          default:
            message.mutable_deliveries()->add_deliveries()->set_object_id(1);
            break;
        }
        break;
      case 10: {  // a call that must see the records sent before it
        v1::GetBufferRequest request;
        request.set_handle(PickHandle());
        v1::GetBufferResponse response;
        auto context = session_.Context(input_.ConsumeBool());
        if (input_.ConsumeBool()) {
          // Carrying fences as rung (its own, another's, any id, 0).
          std::vector<uint64_t> rung;
          for (int i = input_.ConsumeIntegralInRange(1, 3); i > 0; --i) rung.push_back(PickFence());
          context->AddMetadata(kRungMetadataKey, FormatIdList(rung));
        }
        CheckCallStatus(world_.allocator().GetBuffer(context.get(), request, &response),
                        "GetBuffer");
        return;
      }
      default: {  // an Export of an uploaded fd (by id, sent before it)
        v1::ExportRequest request;
        request.set_handle(PickHandle());
        request.set_access(input_.ConsumeBool() ? v1::ACCESS_READ_ONLY : v1::ACCESS_READ_WRITE);
        request.set_upload_id(input_.ConsumeIntegralInRange(0, 20));
        v1::ExportResponse response;
        CheckCallStatus(world_.allocator().Export(session_.Context(true).get(), request, &response),
                        "Export");
        return;
      }
    }
    std::string bytes = message.SerializeAsString();
    // Sometimes cut short, sometimes with a trailing byte.
    if (!bytes.empty() && input_.ConsumeIntegralInRange(0, 7) == 0) {
      bytes.resize(input_.ConsumeIntegralInRange<size_t>(0, bytes.size() - 1));
    } else if (input_.ConsumeIntegralInRange(0, 15) == 0) {
      bytes.push_back(static_cast<char>(input_.ConsumeIntegral<uint8_t>()));
    }
    Send(bytes, input_.ConsumeIntegralInRange(0, 7) == 0 ? PickFds() : std::vector<UniqueFd>{});
  }

  World& world_;
  FuzzedDataProvider& input_;
  Session session_;
  std::vector<uint64_t> handles_;
  std::vector<UniqueFd> buffer_fds_;
  std::vector<uint64_t> fences_;
};

}  // namespace
}  // namespace bufferd

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace bufferd;
  // Lives as long as the process; its socket dir goes when libFuzzer exits.
  static World* world = [] {
    World* made = new World();
    static std::string dir = made->dir();
    std::atexit([] {
      std::error_code ignored;
      std::filesystem::remove_all(dir, ignored);
    });
    return made;
  }();
  const int fds_before = CountOpenFds();
  {
    FuzzedDataProvider input(data, size);
    Run run(*world, input);
    run.Go();
  }
  world->CheckOnlyBystanderLeft();
  // The daemon ends a session on the loop; what it kept of it goes a moment
  // later (the reaper closes fds off the loop). Fewer than before is no
  // leak: an fd of an earlier input may have been on its way out when this
  // one started (seen under ASan on a loaded machine: 20 after, 21 before).
  FUZZ_CHECK(testing::Eventually([&] { return CountOpenFds() <= fds_before; }, absl::Seconds(5),
                                 kPollEvery),
             CountOpenFds(), " fds open, ", fds_before, " before");
  return 0;
}
