from harken.serve.proto import generate

for p in generate():
    print(p)
