// What the examples' mains share: command-line handling (CLI11) with errors
// prefixed by the program's name, validators for numbers a user may
// mistype, and stopping on SIGINT / SIGTERM.
#ifndef BUFFERD_EXAMPLES_CLI_H_
#define BUFFERD_EXAMPLES_CLI_H_

#include <signal.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "CLI/CLI.hpp"

namespace bufferd::examples {

// Parses; nullopt-like -1 when the program should go on, else the exit
// code: 0 after --help, 2 for a bad command line ("program: what\n").
inline int ParseCommandLine(CLI::App& app, int argc, char** argv, const char* program) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& help) {
    return app.exit(help);
  } catch (const CLI::ParseError& error) {
    std::fprintf(stderr, "%s: %s (--help lists the options)\n", program, error.what());
    return 2;
  }
  return -1;
}

// A finite number from `low` to `high` (CLI::Range lets NaN through).
inline CLI::Validator FiniteRange(double low, double high) {
  return CLI::Validator(
      [low, high](std::string& text) -> std::string {
        double value = 0;
        try {
          size_t used = 0;
          value = std::stod(text, &used);
          if (used != text.size()) return "'" + text + "' is not a number";
        } catch (...) {
          return "'" + text + "' is not a number";
        }
        if (!std::isfinite(value) || value < low || value > high) {
          return "'" + text + "' is not from " + std::to_string(low) + " to " +
                 std::to_string(high);
        }
        return "";
      },
      "NUMBER in [" + std::to_string(low) + ", " + std::to_string(high) + "]");
}

// Set by SIGINT or SIGTERM once StopOnSignals ran; the main loop polls it.
inline volatile sig_atomic_t g_stop_requested = 0;
inline void StopOnSignals() {
  struct sigaction stop {};
  stop.sa_handler = [](int) { g_stop_requested = 1; };
  ::sigaction(SIGINT, &stop, nullptr);
  ::sigaction(SIGTERM, &stop, nullptr);
}
inline bool StopRequested() { return g_stop_requested != 0; }

}  // namespace bufferd::examples

#endif  // BUFFERD_EXAMPLES_CLI_H_
