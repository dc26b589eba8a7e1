/* Sequential FC03 x 125 reads over Modbus TCP with libmodbus: the C reference for
 * tools/bench/tcp_client.py. Built there with gcc into tools/bench/.build/.
 *
 *   libmodbus_client HOST PORT N   -> prints microseconds per read (after 200 warm-up reads)
 */
#include <errno.h>
#include <modbus.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s HOST PORT N\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[3]);
    uint16_t regs[125];
    modbus_t *ctx = modbus_new_tcp(argv[1], atoi(argv[2]));
    if (ctx == NULL || modbus_connect(ctx) == -1) {
        fprintf(stderr, "connect failed: %s\n", modbus_strerror(errno));
        return 1;
    }
    modbus_set_slave(ctx, 1);
    for (int i = 0; i < 200; i++) {
        if (modbus_read_registers(ctx, 0, 125, regs) != 125) {
            fprintf(stderr, "read failed: %s\n", modbus_strerror(errno));
            return 1;
        }
    }
    double t0 = now_us();
    for (int i = 0; i < n; i++) {
        if (modbus_read_registers(ctx, 0, 125, regs) != 125) {
            fprintf(stderr, "read failed: %s\n", modbus_strerror(errno));
            return 1;
        }
    }
    double t1 = now_us();
    /* checksum so the reads cannot be optimised away and the caller can verify the data */
    unsigned long sum = 0;
    for (int i = 0; i < 125; i++)
        sum += regs[i];
    printf("%.3f %lu\n", (t1 - t0) / n, sum);
    modbus_close(ctx);
    modbus_free(ctx);
    return 0;
}
