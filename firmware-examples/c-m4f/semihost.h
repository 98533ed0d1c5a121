#ifndef SEMIHOST_H
#define SEMIHOST_H
/* Output and exit over ARM semihosting (QEMU -semihosting-config enable=on). */
void semihost_write(const char *s);
void semihost_exit(int code) __attribute__((noreturn));
#endif
