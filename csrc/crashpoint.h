/* crashpoint.h - fault injection for the crash-consistency test (csrc/crash_store.c).
 *
 * Owns: the CRASH_POINT(name) marks at the instructions where a process dying would leave the
 * arena half-changed: between the stores that publish a page, inside an allocation, a free,
 * a move.  In every normal build they are nothing at all.  Built with -DZC_CRASH_POINTS, each
 * mark calls zc_crash_point(name), which the test program defines: it ends the process there
 * (_exit) when its countdown reaches zero, so recovery is tested at exactly those points and
 * not only where a random SIGKILL happens to land.
 * Must not: be defined by the library (the test program owns the hook), or cost anything when
 * ZC_CRASH_POINTS is not defined.
 */
#ifndef ZC_CRASHPOINT_H
#define ZC_CRASHPOINT_H

#ifdef ZC_CRASH_POINTS
void zc_crash_point(const char *name);
#define CRASH_POINT(name) zc_crash_point(name)
#else
#define CRASH_POINT(name) ((void)0)
#endif

#endif
