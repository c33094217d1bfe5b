#!/usr/bin/env bash
# Install what the Vulkan variant of pyllama needs to build and run on Debian 12,
# and print the include directory of a Vulkan SDK new enough for ggml-vulkan.
#
#   tools/vulkan_deps.sh [PREFIX]      (default PREFIX: build/vulkan-sdk)
#
# From Debian 12 (the system's own apt sources): glslc, spirv-headers,
# mesa-vulkan-drivers (lavapipe, a Vulkan device on the CPU), libvulkan1 (the
# loader pyllama links against, by its full name libvulkan.so.1, and loads at
# run time; Debian 12's libvulkan-dev is not needed) and vulkan-tools
# (vulkaninfo; optional).
#
# Debian 12's lavapipe (Mesa 22.3.6) frees memory twice in its queue thread once
# sampler chains have been attached and detached a few times (pyllama's backend
# sampling; see pyllama.backend_sampling.LAVAPIPE_BACKEND_SAMPLING_FROM), so on Debian 12
# mesa-vulkan-drivers comes from bookworm-backports (Mesa 25.0), Debian's own
# suite of newer packages for 12: its apt source is added as
# /etc/apt/sources.list.d/pyllama-bookworm-backports.sources; backports are
# never chosen unless asked for by name, so nothing else changes.
#
# Debian 12's Vulkan headers (1.3.239) lack VK_EXT_layer_settings, which the
# vendored ggml-vulkan uses, so the headers come from Debian 13's libvulkan-dev
# (1.4.x). That one package is fetched with apt's own client into a PRIVATE apt
# state under PREFIX (its own sources.list, lists and cache directories; the
# system's sources, lists and pins are neither read nor changed), verified by
# apt against Debian's archive keys, and unpacked with `dpkg -x` into PREFIX.
# Nothing is installed from Debian 13. Idempotent: a second run fetches nothing.
#
# Environment:
#   PYLLAMA_DEBIAN_MIRROR   Debian mirror for the private state
#                           (default: the one the system's sources use, else deb.debian.org)
#   PYLLAMA_VULKAN_SUITE    suite to take libvulkan-dev from (default: trixie)
#
# The last line printed on stdout is the include directory (PREFIX/usr/include);
# everything else goes to stderr. Hand it to the build as
#   PYLLAMA_VULKAN_SDK=PREFIX/usr   (read by the accelerator block of CMakeLists.txt)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=${1:-$root/build/vulkan-sdk}
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)
suite=${PYLLAMA_VULKAN_SUITE:-trixie}
arch=$(dpkg --print-architecture)

log() { echo "vulkan_deps: $*" >&2; }
# The Debian mirror the system's apt sources use (deb.debian.org when none is found).
system_mirror() {
  local m
  m=$(grep -hoE '^(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
        /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
      | grep -oE 'https?://[^[:space:]]+' | head -n1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo); fi

# --- 1. the system packages (Debian 12) -------------------------------------
required=(glslc spirv-headers mesa-vulkan-drivers libvulkan1)
optional=(vulkan-tools)
missing=()
for pkg in "${required[@]}" "${optional[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$pkg")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq >&2
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${required[@]}" >&2
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${optional[@]}" >&2 \
    || log "warning: optional ${optional[*]} not installed (vulkaninfo unavailable)"
else
  log "system packages present: ${required[*]} ${optional[*]}"
fi

# --- 1b. a lavapipe that survives backend sampling (Mesa >= 25.0) ---------------
mesa_min=25.0
mesa_ver=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true)
codename=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release 2>/dev/null || true)
if [ -n "$mesa_ver" ] && dpkg --compare-versions "$mesa_ver" lt "$mesa_min"; then
  if [ "$codename" = bookworm ]; then
    bpo=/etc/apt/sources.list.d/pyllama-bookworm-backports.sources
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      log "adding bookworm-backports ($bpo) for lavapipe >= $mesa_min"
      printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
        "$(system_mirror)" /usr/share/keyrings/debian-archive-keyring.gpg \
        | "${sudo[@]}" tee "$bpo" > /dev/null
    fi
    log "installing mesa-vulkan-drivers from bookworm-backports (installed: $mesa_ver)"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq >&2
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends -t bookworm-backports mesa-vulkan-drivers >&2
    mesa_ver=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers)
  else
    log "warning: lavapipe $mesa_ver is older than Mesa $mesa_min: pyllama refuses backend sampling on it"
  fi
fi
log "lavapipe: mesa-vulkan-drivers $mesa_ver"

# --- 2. headers new enough for ggml-vulkan -----------------------------------
# Where the distribution's own libvulkan-dev is new enough (Ubuntu 24.04 has
# 1.3.275; VK_EXT_layer_settings arrived in 1.3.272), use it.
sys_ver=$(apt-cache policy libvulkan-dev 2>/dev/null | sed -n 's/^ *Candidate: //p')
if [ -n "$sys_ver" ] && [ "$sys_ver" != "(none)" ] && dpkg --compare-versions "$sys_ver" ge 1.3.272; then
  if ! dpkg-query -W -f='${Status}' libvulkan-dev 2>/dev/null | grep -q '^install ok installed$'; then
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends libvulkan-dev >&2
  fi
  log "the system's libvulkan-dev $sys_ver is new enough: build with PYLLAMA_VULKAN_SDK=/usr"
  echo "/usr/include"
  exit 0
fi

# Otherwise Debian 13's, through a private apt state.
stamp="$prefix/.pyllama-vulkan-sdk"
if [ -f "$stamp" ] && [ -f "$prefix/usr/include/vulkan/vulkan.hpp" ] \
   && grep -q "LayerSettingEXT" "$prefix/usr/include/vulkan/vulkan_structs.hpp" 2>/dev/null; then
  log "$(cat "$stamp") already unpacked in $prefix"
else
  mirror=${PYLLAMA_DEBIAN_MIRROR:-$(system_mirror)}
  state="$prefix/apt"
  mkdir -p "$state/etc/preferences.d" "$state/etc/sources.list.d" "$state/lists/partial" \
           "$state/cache/archives/partial" "$state/debs"
  echo "deb [arch=$arch signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" \
    > "$state/etc/sources.list"
  # Every path apt would otherwise take from the system points into $state;
  # dpkg's status stays the system's (read only) so apt knows what is installed.
  apt_opts=(
    -o "Dir::Etc::SourceList=$state/etc/sources.list"
    -o "Dir::Etc::SourceParts=$state/etc/sources.list.d"
    -o "Dir::Etc::Preferences=$state/etc/preferences"
    -o "Dir::Etc::PreferencesParts=$state/etc/preferences.d"
    -o "Dir::State::Lists=$state/lists"
    -o "Dir::Cache=$state/cache"
    -o "Dir::Cache::archives=$state/cache/archives"
    -o "APT::Architecture=$arch"
    -o "APT::Architectures=$arch"
    -o "Acquire::Languages=none"
    -o "Debug::NoLocking=1"
    -o "APT::Sandbox::User=root"
  )
  log "fetching libvulkan-dev from Debian $suite ($mirror) into a private apt state"
  apt-get "${apt_opts[@]}" update -qq >&2
  version=$(apt-cache "${apt_opts[@]}" show --no-all-versions libvulkan-dev | sed -n 's/^Version: //p' | head -n1)
  [ -n "$version" ] || { log "libvulkan-dev not found in $suite"; exit 1; }
  # Headers may live in a package libvulkan-dev depends on (vulkan-headers in
  # some releases): fetch whichever of the two exist.
  pkgs=(libvulkan-dev)
  if apt-cache "${apt_opts[@]}" show vulkan-headers >/dev/null 2>&1 \
     && apt-cache "${apt_opts[@]}" depends libvulkan-dev | grep -q 'Depends: vulkan-headers'; then
    pkgs+=(vulkan-headers)
  fi
  (cd "$state/debs" && rm -f ./*.deb && apt-get "${apt_opts[@]}" download "${pkgs[@]}" >&2)
  rm -rf "${prefix:?}/usr"
  for deb in "$state"/debs/*.deb; do
    log "unpacking $(basename "$deb")"
    dpkg -x "$deb" "$prefix"
  done
  if ! grep -q "LayerSettingEXT" "$prefix/usr/include/vulkan/vulkan_structs.hpp" 2>/dev/null; then
    log "the unpacked headers lack VK_EXT_layer_settings: $prefix/usr/include"
    exit 1
  fi
  echo "libvulkan-dev $version ($suite)" > "$stamp"
fi

# The prefix's libvulkan.so points at a libvulkan.so.1 the prefix does not
# have; pyllama links against the system loader (libvulkan1, Debian 12).
libdir=$(dpkg-query -L libvulkan1 | grep -E '/libvulkan\.so\.1$' | head -n1)
log "loader: $libdir (system); headers: $(cat "$stamp")"
log "build with: PYLLAMA_VULKAN_SDK=$prefix/usr"
echo "$prefix/usr/include"
