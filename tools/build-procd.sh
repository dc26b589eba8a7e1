#!/bin/sh
# Build OpenWrt's procd (and the ubusd/ubus/libubox/jshn it needs) for this Debian host, so that
# tests/test_notify_procd.py can run init/modbus-agent under a real procd:
#
#   tools/build-procd.sh /tmp/procd-root            # needs git, cmake, gcc, libjson-c-dev
#   PROCD_ROOT=/tmp/procd-root .venv/bin/python -m pytest tests/test_notify_procd.py
#
# procd is pinned to 37eed131 (2021-02-23), the version Teltonika's RutOS 7 SDK ships (RUT
# routers); PROCD_REV=master builds OpenWrt's current one (then also udebug is needed: built
# here as a bare library). Host fixes, none in procd's logic: -Werror off (newer gcc warnings),
# strlcpy for glibc < 2.38. Sources are cloned from git.openwrt.org mirrors on GitHub.
set -eu
PREFIX=${1:?usage: build-procd.sh PREFIX}
PROCD_REV=${PROCD_REV:-37eed131e9967a35f47bacb3437a9d3c8a57b3f4}
SRC=${SRC:-$PREFIX/src}
mkdir -p "$SRC" "$PREFIX"
cd "$SRC"
for r in libubox ubus udebug procd; do
	[ -d "$r" ] || git clone -q "https://github.com/openwrt/$r" "$r"
done
export CFLAGS="-I$PREFIX/include" LDFLAGS="-L$PREFIX/lib"
(cd libubox && cmake -B b -DCMAKE_INSTALL_PREFIX="$PREFIX" -DBUILD_LUA=OFF -DBUILD_EXAMPLES=OFF . && make -C b install)
(cd ubus && cmake -B b -DCMAKE_INSTALL_PREFIX="$PREFIX" -DCMAKE_PREFIX_PATH="$PREFIX" -DBUILD_LUA=OFF \
	-DBUILD_EXAMPLES=OFF . && make -C b install)
(cd udebug && gcc -O2 -fPIC -shared -std=gnu99 -I"$PREFIX/include" lib.c lib-pcap.c -L"$PREFIX/lib" \
	-lubox -lubus -o "$PREFIX/lib/libudebug.so" && cp udebug.h udebug-pcap.h "$PREFIX/include/")
cd procd
git checkout -q "$PROCD_REV"
sed -i 's/-Werror //' CMakeLists.txt
grep -q 'glibc < 2.38' utils/utils.c || python3 - <<'PY'
p = "utils/utils.c"
s = open(p).read()
i = s.index("\n", s.rindex("#include"))
s = s[:i + 1] + """
/* glibc < 2.38 has no strlcpy (host build for tests) */
size_t strlcpy(char *dst, const char *src, size_t size);
size_t strlcpy(char *dst, const char *src, size_t size)
{
	size_t n = strlen(src);
	if (size) {
		size_t m = n >= size ? size - 1 : n;
		memcpy(dst, src, m);
		dst[m] = 0;
	}
	return n;
}
""" + s[i + 1:]
open(p, "w").write(s)
PY
cmake -B b -DCMAKE_INSTALL_PREFIX="$PREFIX" -DCMAKE_PREFIX_PATH="$PREFIX" .
make -C b procd
mkdir -p "$PREFIX/sbin"
cp b/procd "$PREFIX/sbin/procd"
echo "procd in $PREFIX/sbin/procd; run: PROCD_ROOT=$PREFIX pytest tests/test_notify_procd.py"
