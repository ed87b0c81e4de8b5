/*
 * notify_internal.h: what notify.c (delivery) and notify_addr.c (the address rules) share;
 * included by src/notify/ only.
 */
#ifndef INFERD_NOTIFY_INTERNAL_H
#define INFERD_NOTIFY_INTERNAL_H

/* 1 while notify_set_listen() was told a port of 0: the notifier starts no delivery until it
 * knows the port it must refuse. Any thread. */
int notify_listen_pending(void);

#endif
