#!/usr/bin/env bash
# Synthesises the bundled demo corpus: short English and Mandarin utterances spoken by
# espeak-ng, stored as a mix of FLAC / WAV / MP3 at 16, 22.05, 44.1 and 48 kHz (some
# stereo), with manifests train.jsonl and valid.jsonl (our JSON-lines format).
#
# The text is chosen to be learnable by a tiny Conformer-CTC in minutes on a CPU: digit
# strings (English words / Mandarin characters) with a handful of carrier phrases. Speakers
# differ by espeak voice variant, pitch, speed and level so no two utterances are alike.
#
# Deterministic: all choices come from a fixed-seed linear congruential generator, and sox
# runs in repeatable mode without dither. Tools: espeak-ng, sox, flac, lame.
# Usage: manifests/demo/make_demo.sh   (rewrites manifests/demo/audio and the manifests)
set -euo pipefail
cd "$(dirname "$0")"

for tool in espeak-ng sox flac lame; do
    command -v "$tool" >/dev/null || { echo "make_demo.sh: needs $tool" >&2; exit 1; }
done

N=150            # utterances; every 10th and 10th+7 go to valid (20 %)
seed=20261123

# Draws R uniformly from 0..$1-1 (glibc-style LCG, high bits).
draw() {
    seed=$(( (seed * 1103515245 + 12345) % 2147483648 ))
    R=$(( (seed / 65536) % $1 ))
}

EN_DIGITS=(zero one two three four five six seven eight nine)
ZH_DIGITS=(零 一 二 三 四 五 六 七 八 九)
# English carriers: "%s" is replaced by the digit words.
EN_CARRIERS=("%s" "%s" "%s" "call %s" "dial %s" "the code is %s" "room number %s"
             "%s please" "yes %s" "no %s")
ZH_CARRIERS=("%s" "%s" "%s" "我的号码是%s" "请拨打%s" "房间%s号" "电话%s")
# Speakers: name, espeak voice, pitch, speed (words per minute).
EN_SPEAKERS=("en_m1 en-us+m1 45 165" "en_m3 en-us+m3 35 150" "en_m7 en-us+m7 55 175"
             "en_f2 en-us+f2 60 160" "en_f3 en-us+f3 70 170" "en_f5 en-us+f5 50 145")
ZH_SPEAKERS=("zh_m2 cmn-latn-pinyin+m2 40 150" "zh_f2 cmn-latn-pinyin+f2 65 145"
             "zh_m4 cmn-latn-pinyin+m4 50 160" "zh_f4 cmn-latn-pinyin+f4 55 140")
# Storage per utterance, cycling: codec, sample rate, channels.
FORMATS=("mp3 16000 1" "mp3 22050 1" "flac 22050 1" "mp3 44100 2" "mp3 48000 1"
         "mp3 22050 1" "wav 16000 1" "mp3 16000 1" "mp3 44100 1" "mp3 48000 2"
         "mp3 16000 1" "mp3 22050 1" "flac 44100 2" "mp3 44100 1" "mp3 16000 1"
         "mp3 48000 1" "mp3 22050 1" "mp3 44100 1" "mp3 16000 1" "mp3 48000 1")

digits_text() {  # $1 = en|zh, $2 = count → TEXT
    local words=() d
    for (( d = 0; d < $2; d++ )); do
        draw 10
        if [[ $1 == en ]]; then words+=("${EN_DIGITS[R]}"); else words+=("${ZH_DIGITS[R]}"); fi
    done
    if [[ $1 == en ]]; then TEXT="${words[*]}"; else TEXT=$(printf '%s' "${words[@]}"); fi
}

json_escape() { local s=${1//\\/\\\\}; printf '%s' "${s//\"/\\\"}"; }

rm -rf audio && mkdir -p audio
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
: > train.jsonl
: > valid.jsonl

for (( i = 0; i < N; i++ )); do
    if (( i % 5 < 3 )); then lang=en; else lang=zh; fi
    if [[ $lang == en ]]; then
        draw 4; digits_text en $(( R + 2 ))
        draw ${#EN_CARRIERS[@]}; carrier=${EN_CARRIERS[R]}
        speakers=("${EN_SPEAKERS[@]}")
    else
        draw 5; digits_text zh $(( R + 3 ))
        draw ${#ZH_CARRIERS[@]}; carrier=${ZH_CARRIERS[R]}
        speakers=("${ZH_SPEAKERS[@]}")
    fi
    text=${carrier//%s/$TEXT}
    draw ${#speakers[@]}
    read -r speaker voice pitch speed <<< "${speakers[R]}"
    draw 17; pitch=$(( pitch + R - 8 ))
    draw 31; speed=$(( speed + R - 15 ))
    draw 6; gain="0.$(( R + 4 ))"                   # 0.4 .. 0.9
    read -r codec rate channels <<< "${FORMATS[i % ${#FORMATS[@]}]}"
    id=$(printf '%s-%04d' "$speaker" "$i")
    file="audio/$id.$codec"

    espeak-ng -v "$voice" -p "$pitch" -s "$speed" -w "$tmp/raw.wav" "$text"
    # Trim espeak's silences to 0.1 s, set the level, resample, make stereo (right quieter).
    remix=(); (( channels == 2 )) && remix=(remix 1 1v0.7)
    sox -R -D "$tmp/raw.wav" "$tmp/cut.wav" silence 1 0.02 0.5% reverse silence 1 0.02 0.5% reverse \
        pad 0.1 0.1 vol "$gain" rate -v "$rate" "${remix[@]}"
    case $codec in
        wav)  cp "$tmp/cut.wav" "$file" ;;
        flac) flac --silent --best --no-padding -f -o "$file" "$tmp/cut.wav" ;;
        mp3)  lame --quiet -b 32 --resample "$(( rate / 1000 )).$(( rate % 1000 / 50 ))" \
                  "$tmp/cut.wav" "$file" ;;
    esac

    line=$(printf '{"id": "%s", "path": "%s", "text": "%s", "speaker": "%s"}' \
        "$id" "$file" "$(json_escape "$text")" "$speaker")
    if (( i % 10 == 1 || i % 10 == 8 )); then echo "$line" >> valid.jsonl; else echo "$line" >> train.jsonl; fi
done

echo "demo corpus: $(wc -l < train.jsonl) train, $(wc -l < valid.jsonl) valid, $(du -sk audio | cut -f1) KiB of audio"
