/*
 * log.h: one function writes every log line, one event per line, as key=value pairs.
 *
 *   ts=2025-03-02T10:31:02.114Z level=warn module=queue msg="lease expired" job=01HQ7
 *
 * The macros check the level before formatting. Request bodies and secrets are never logged.
 */
#ifndef INFERD_LOG_H
#define INFERD_LOG_H

enum log_level { LOG_LEVEL_ERROR = 0, LOG_LEVEL_WARN, LOG_LEVEL_INFO, LOG_LEVEL_DEBUG };

extern enum log_level log_threshold;

/* Parses "error", "warn", "info" or "debug"; returns 0 or -1. */
int log_set_level(const char *name);

/* `fmt` formats the trailing key=value pairs; it may be "" . */
void log_write(enum log_level level, const char *module, const char *msg, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define LOG_AT(lvl, module, msg, ...)                                                              \
    do {                                                                                           \
        if ((lvl) <= log_threshold)                                                                \
            log_write((lvl), (module), (msg), __VA_ARGS__);                                        \
    } while (0)
#define log_error(module, msg, ...) LOG_AT(LOG_LEVEL_ERROR, module, msg, __VA_ARGS__)
#define log_warn(module, msg, ...) LOG_AT(LOG_LEVEL_WARN, module, msg, __VA_ARGS__)
#define log_info(module, msg, ...) LOG_AT(LOG_LEVEL_INFO, module, msg, __VA_ARGS__)
#define log_debug(module, msg, ...) LOG_AT(LOG_LEVEL_DEBUG, module, msg, __VA_ARGS__)

#endif
