"""A few steps of distillation with fastkd's fused KD loss on random data."""

import torch

import fastkd

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
batch, seq, vocab, hidden = 4, 16, 1000, 64
teacher = torch.nn.Linear(hidden, vocab).to(device)
student = torch.nn.Linear(hidden, vocab).to(device)
criterion = fastkd.nn.KDLoss(temperature=2.0, alpha=0.5)
opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
for step in range(20):
    x = torch.randn(batch, seq, hidden, device=device)
    target = torch.randint(0, vocab, (batch, seq), device=device)
    target[:, -2:] = -100  # padding positions are ignored
    with torch.no_grad():
        t_logits = teacher(x)
    loss = criterion(student(x), t_logits, target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  kd loss {loss.item():.4f}")
print(fastkd.info()["ops"]["kd_loss"]["auto"])
