import sys, time, copy, json, torch
sys.path.insert(0, "/work/main")
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer
from calib.text_sources import read_text, tokenize_text, sample_windows
from calib.capture import capture_block_inputs, BlockKwargs, block_output
from calib.activations import ActivationStream
from pruners import get_pruner, SparsityPattern
from reconstruct.methods import ReconSpec, attach_method, train_reconstruction, evaluate_mse
from reconstruct.statistics import feeding_statistics
from reconstruct.architecture import weight_as_out_in
folder = "/root/.cache/reconstruct/smollm2-135m"
m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(folder)
ids = tokenize_text(read_text("/work/shared/data/wikitext-2/valid.txt"), tok)
tokens = sample_windows(ids, 16, 256, 0)
K = int(sys.argv[1]); sparsity = float(sys.argv[2])
s = ActivationStream(16, 256, 576, torch.float32, torch.device("cpu"), "cpu")
bysize = capture_block_inputs(m, m.model.layers[0], tokens, 8, s.write, torch.device("cpu"))
bysize.update(capture_block_inputs(m, m.model.layers[0], tokens[:1], 1, lambda r,x: None, torch.device("cpu")))
kw = BlockKwargs(bysize)
def fwd(block): return lambda x: block_output(block(x, **kw.for_batch(x.shape[0])))
with torch.no_grad():
    for i in range(K):
        for st in range(0,16,8): s.write(slice(st,st+8), fwd(m.model.layers[i])(s.read(slice(st,st+8))))
block0 = m.model.layers[K]
d = ActivationStream(16, 256, 576, torch.float32, torch.device("cpu"), "cpu")
with torch.no_grad():
    for st in range(0,16,8): d.write(slice(st,st+8), fwd(block0)(s.read(slice(st,st+8))))
pruner = get_pruner("wanda"); pat = SparsityPattern.parse("unstructured", sparsity)
names = [n for n, mod in block0.named_modules() if isinstance(mod, torch.nn.Linear)]
stats = {n: pruner.new_stats(block0.get_submodule(n).weight.shape[1], "cpu") for n in names}
with torch.no_grad(), feeding_statistics({n: block0.get_submodule(n) for n in names}, stats):
    for st in range(0,16,8): fwd(block0)(s.read(slice(st,st+8)))
masks = {}
for n in names:
    mod = block0.get_submodule(n); w, k = pruner.prune(mod.weight.detach().float().clone(), stats[n], pat)
    with torch.no_grad(): mod.weight.copy_(w)
    masks[n] = k
base = evaluate_mse(fwd(block0), s, d, 8)
print("K", K, "sparsity", sparsity, "mse pruned", base, flush=True)
for method, steps, batch, lr in [(a,b,c,e) for a in sys.argv[3].split(",") for (b,c,e) in [(20,1,5e-4),(20,1,2e-3),(64,2,5e-4),(64,2,2e-3),(64,2,5e-3),(128,4,2e-3)]]:
    blk = copy.deepcopy(block0)
    lin = {n: blk.get_submodule(n) for n in names}
    h = attach_method(method, blk, lin, masks, rank=16, alpha=32, bias_linears=set(names), seed=0)
    t = time.time()
    spec = ReconSpec(method=method, steps=steps, batch_size=batch, micro_batch=batch, lr=lr)
    r = train_reconstruction(fwd(blk), h.trainable_parameters(), s, d, spec, seed=0, eval_micro_batch=8)
    print(json.dumps(dict(method=method, steps=steps, batch=batch, lr=lr, ratio=r.mse_after/base, secs=round(time.time()-t,1))), flush=True)
