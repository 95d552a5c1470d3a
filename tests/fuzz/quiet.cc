// Every fuzz target's LLVMFuzzerInitialize: the daemon's logging off, with
// libprotobuf's and gRPC's lines routed through it as in bufferd (a refused
// record or config is not news here, and a line per input would drown
// libFuzzer's own output).
#include "daemon/log.h"
#include "spdlog/spdlog.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  bufferd::InstallLibraryLogHandlers();
  spdlog::set_level(spdlog::level::off);
  return 0;
}
