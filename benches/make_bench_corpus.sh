#!/usr/bin/env bash
# Builds the mixed corpus the prepare benchmark runs on: espeak-ng speech, FLAC/MP3/WAV/Ogg at
# 16-48 kHz, mono and stereo. usage: make_bench_corpus.sh OUT_DIR [MINUTES]   (default 90 min)
# Needs espeak-ng, sox (libsox-fmt-all), lame, oggenc, flac. Deterministic (no randomness).
set -euo pipefail
out=${1:?usage: make_bench_corpus.sh OUT_DIR [MINUTES]}
minutes=${2:-90}
mkdir -p "$out"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
text="The quick brown fox jumps over the lazy dog. Speech recognition systems learn from many hours \
of transcribed audio, and self supervised models learn from even more audio without transcripts. \
One two three four five six seven eight nine ten. Preparing a corpus once saves time in every experiment."
voices=(en-us en-gb en-us+f2 en-gb+m3 en-us+f4 en-us+m7)
# one minute of speech per voice, at 48 kHz stereo (the richest source), made once
for i in "${!voices[@]}"; do
  espeak-ng -v "${voices[$i]}" -s $((150 + 10 * i)) -w "$tmp/v$i.wav" "$text $text $text"
  sox "$tmp/v$i.wav" -r 48000 -c 2 "$tmp/v$i.48k.wav" repeat 9 trim 0 60
done
formats=(flac16m mp344s wav48s ogg48s flac44s mp316m wav16m ogg22m)
for n in $(seq 0 $((minutes - 1))); do
  src="$tmp/v$((n % ${#voices[@]})).48k.wav"
  f=${formats[$((n % ${#formats[@]}))]}
  name=$(printf "%s/utt%04d" "$out" "$n")
  case $f in
    flac16m) sox "$src" -r 16000 -c 1 "$name.flac" ;;
    flac44s) sox "$src" -r 44100 -c 2 "$name.flac" ;;
    mp344s)  sox "$src" -r 44100 -c 2 -t wav - | lame --quiet -b 128 - "$name.mp3" ;;
    mp316m)  sox "$src" -r 16000 -c 1 -t wav - | lame --quiet -b 64 - "$name.mp3" ;;
    wav48s)  sox "$src" -b 16 "$name.wav" ;;
    wav16m)  sox "$src" -r 16000 -c 1 -b 16 "$name.wav" ;;
    ogg48s)  oggenc -Q -q 4 -o "$name.ogg" "$src" ;;
    ogg22m)  sox "$src" -r 22050 -c 1 -t wav - | oggenc -Q -q 4 -o "$name.ogg" - ;;
  esac
done
echo "bench corpus: $minutes files of 60 s in $out ($(du -sh "$out" | cut -f1))"
