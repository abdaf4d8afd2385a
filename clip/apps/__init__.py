"""The applications built on the model side: `clipcoco bench` (bench, bench_peers, bench_data), `clipcoco demo`,
`clipcoco search`, `clipcoco zeroshot` and `clipcoco plot`. Nothing in clip/'s top level imports them."""
