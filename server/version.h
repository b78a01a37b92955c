/* The version fanout reports (--version, startup log, fanout_build_info). */
#ifndef FANOUT_VERSION_H
#define FANOUT_VERSION_H
#define FANOUT_VERSION "0.1.0"
#endif
