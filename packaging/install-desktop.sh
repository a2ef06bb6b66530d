#!/usr/bin/env bash
# Installs a built app folder for the current user: copies dist/quantscope to
# ~/.local/opt/quantscope, links ~/.local/bin/quantscope to it, and adds the desktop entry and
# icon so Quantscope appears in the application menu.
#   packaging/install-desktop.sh [dist/quantscope]
#   packaging/install-desktop.sh --uninstall
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${XDG_DATA_HOME:-$HOME/.local/share}
opt=$HOME/.local/opt/quantscope
bin=$HOME/.local/bin/quantscope
desktop=$prefix/applications/quantscope.desktop
icon=$prefix/icons/hicolor/scalable/apps/quantscope.svg

if [ "${1:-}" = --uninstall ]; then
  rm -rf "$opt" "$bin" "$desktop" "$icon"
  echo "install-desktop.sh: removed Quantscope from $opt, $bin, $desktop and $icon"
  exit 0
fi

src=${1:-dist/quantscope}
[ -x "$src/quantscope" ] || { echo "install-desktop.sh: $src/quantscope not found; build it first with packaging/build.sh" >&2; exit 2; }
mkdir -p "$(dirname "$opt")" "$(dirname "$bin")" "$(dirname "$desktop")" "$(dirname "$icon")"
rm -rf "$opt"
cp -a "$src" "$opt"
ln -sfn "$opt/quantscope" "$bin"
# Absolute paths: the menu does not see a PATH edited in shell start-up files.
sed -e "s|^Exec=quantscope|Exec=$opt/quantscope|" -e "s|^TryExec=quantscope|TryExec=$opt/quantscope|" \
  packaging/quantscope.desktop > "$desktop"
cp resources/icons/quantscope.svg "$icon"
command -v update-desktop-database >/dev/null && update-desktop-database -q "$(dirname "$desktop")" || true
echo "install-desktop.sh: installed to $opt (command: $bin, menu entry: $desktop)"
