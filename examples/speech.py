"""Speech recognition and speech translation with Gemma 3n's audio encoder.

    python examples/speech.py --model google/gemma-3n-E2B-it talk.wav                # transcribe
    python examples/speech.py --model google/gemma-3n-E2B-it talk.wav --to French    # translate

Audio longer than 30 s is split at quiet points into segments of at most 30 s, each given
to the model as its own audio block in the same prompt, so the answer covers the whole clip.
"""

import argparse

import mlx_gemma3n
from mlx_gemma3n import user_message

ASR_PROMPT = "Transcribe this audio."
# Chain of thought: first transcribe in the source language, then translate the transcript.
AST_PROMPT = (
    "Transcribe this audio in its original language, then translate the transcription into "
    "{target}. Answer in the form:\nTranscription: ...\n{target}: ..."
)

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("audio")
p.add_argument("--to", help="translate into this language instead of transcribing")
args = p.parse_args()

model, processor = mlx_gemma3n.load(args.model)
text = AST_PROMPT.format(target=args.to) if args.to else ASR_PROMPT
mlx_gemma3n.generate(model, processor, [user_message(text, audio=[args.audio])], max_tokens=1024, verbose=True)
