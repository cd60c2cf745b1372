"""Direct Preference Optimization (Rafailov et al., 2023): the practical stand-in
for RLHF. For a prompt x with a preferred response y_w and a rejected y_l,

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

where ref is the model frozen as it entered the stage. The implicit rewards
beta * (log pi - log ref) give the monitored reward margin and accuracy."""
import torch
import torch.nn.functional as F


def response_logprob(model, prompt_BP: torch.Tensor, response_BR: torch.Tensor) -> torch.Tensor:
    """Sum over the response tokens of log p(token | everything before it), per row."""
    tokens_BL = torch.cat([prompt_BP, response_BR], dim=1)
    logits = model(tokens_BL[:, :-1]).float()
    start = prompt_BP.shape[1] - 1  # logits at position i predict token i + 1
    logp_BRV = logits[:, start:].log_softmax(-1)
    return logp_BRV.gather(-1, response_BR.unsqueeze(-1)).squeeze(-1).sum(-1)


def dpo_loss(policy, reference, prompt_BP, chosen_BR, rejected_BR, beta: float):
    """(loss, reward margin per row, reward accuracy): the two responses go through
    each model in one batch, each pair's rows side by side (chosen, rejected, chosen,
    ...): an MoE with a capacity drops the batch's later tokens first, which with the
    chosen rows first all fell on the rejected ones."""
    both_prompt = torch.stack([prompt_BP, prompt_BP], dim=1).flatten(0, 1)
    both_response = torch.stack([chosen_BR, rejected_BR], dim=1).flatten(0, 1)
    policy_logp = response_logprob(policy, both_prompt, both_response)
    with torch.no_grad():
        reference_logp = response_logprob(reference, both_prompt, both_response)
    rewards = beta * (policy_logp - reference_logp)
    chosen_reward, rejected_reward = rewards.view(-1, 2).unbind(1)
    margin = chosen_reward - rejected_reward
    return -F.logsigmoid(margin).mean(), margin.detach(), (margin > 0).float().mean().detach()
