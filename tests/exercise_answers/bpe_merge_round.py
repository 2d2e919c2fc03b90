def bpe_merge_round(word, merges):
    best = None
    for i in range(len(word) - 1):
        pair = (word[i], word[i + 1])
        if pair in merges and (best is None or merges[pair][0] < merges[best][0]):
            best = pair
    if best is None:
        return None
    rank, merged = merges[best]
    new, at, i = [], [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
            new.append(merged)
            at.append(i)
            i += 2
        else:
            new.append(word[i])
            i += 1
    return rank, best, merged, at, new
