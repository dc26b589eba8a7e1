/* Minimal Modbus TCP server for tools/bench/tcp_client.py: one thread per connection, every
 * 12-byte request is answered with a canned FC03 x 125 response carrying the request's
 * transaction id. Written in C so that the server's own time is small and the clients'
 * differences dominate the figures.
 *
 *   fast_server   -> prints the port it listens on (127.0.0.1, ephemeral), then serves forever
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static unsigned char response[9 + 250];

static void *serve(void *arg)
{
    int fd = (int)(intptr_t)arg;
    int one = 1;
    unsigned char req[12], out[sizeof response];
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    memcpy(out, response, sizeof out);
    for (;;) {
        size_t got = 0;
        while (got < sizeof req) {
            ssize_t n = recv(fd, req + got, sizeof req - got, 0);
            if (n <= 0)
                goto done;
            got += (size_t)n;
        }
        out[0] = req[0];
        out[1] = req[1];
        if (send(fd, out, sizeof out, 0) != (ssize_t)sizeof out)
            goto done;
    }
done:
    close(fd);
    return NULL;
}

int main(void)
{
    /* MBAP: tid (filled per request), protocol 0, length 253, unit 1; PDU 03 fa + 125 registers */
    response[4] = 0;
    response[5] = 253;
    response[6] = 1;
    response[7] = 3;
    response[8] = 250;
    for (int i = 0; i < 125; i++) {
        unsigned v = (unsigned)(i * 521) & 0xFFFF;
        response[9 + 2 * i] = v >> 8;
        response[10 + 2 * i] = v & 0xFF;
    }
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {0};
    socklen_t len = sizeof a;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 16) ||
        getsockname(ls, (struct sockaddr *)&a, &len)) {
        perror("fast_server");
        return 1;
    }
    printf("%d\n", ntohs(a.sin_port));
    fflush(stdout);
    for (;;) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0)
            continue;
        pthread_t t;
        pthread_create(&t, NULL, serve, (void *)(intptr_t)fd);
        pthread_detach(t);
    }
}
