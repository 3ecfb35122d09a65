using System.Collections.Concurrent;
using Microsoft.Extensions.Options;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// Completed responses this process has replayed, so that the next replay of the same key and request skips the
/// grain. Sound because a completed record is final until its retention ends: nothing the grain could answer later
/// differs from what it answered once (DESIGN §2). Entries end a few seconds before the record's retention, measured
/// by this process's clock from what was left of it when the grain answered (so that a clock behind the silo's does
/// not keep an entry past it), and the oldest go first when the entries' bytes exceed <see cref="IdempotencyOptions.ReplayCacheBytes"/>.
/// A request whose fingerprint differs is never answered here: the grain decides it.
/// </summary>
internal sealed class ReplayCache(IOptions<IdempotencyOptions> options, TimeProvider time)
{
    // What an entry costs beyond its body and headers: the key, the fingerprint, the objects around them.
    private const int EntryOverheadBytes = 256;

    private static readonly TimeSpan ClockSkewAllowance = TimeSpan.FromSeconds(5);

    private readonly ConcurrentDictionary<IdempotencyKey, Entry> entries = new();

    // Every entry ever added, oldest first, until the budget pushes it out. The bytes count this queue, not the
    // dictionary: an entry that expired (and left the dictionary) still holds its memory here until it is dequeued.
    private readonly ConcurrentQueue<(IdempotencyKey Key, Entry Entry)> oldestFirst = new();
    private long bytes;

    /// <summary>The bytes held, as counted against <see cref="IdempotencyOptions.ReplayCacheBytes"/>.</summary>
    public long Bytes => Interlocked.Read(ref bytes);

    /// <summary>The stored response of <paramref name="key"/>, if this process has it for this very request.</summary>
    public StoredResponse? Find(IdempotencyKey key, byte[] fingerprint)
    {
        if (!entries.TryGetValue(key, out var entry))
        {
            return null;
        }

        if (time.GetUtcNow() >= entry.ExpiresAt)
        {
            entries.TryRemove(new KeyValuePair<IdempotencyKey, Entry>(key, entry));
            return null;
        }

        return entry.Fingerprint.AsSpan().SequenceEqual(fingerprint) ? entry.Response : null;
    }

    /// <summary>Keeps the answer of a claim that found <paramref name="key"/> completed.</summary>
    public void Add(IdempotencyKey key, byte[] fingerprint, ClaimResult completed)
    {
        if (completed is not { Outcome: ClaimOutcome.Completed, Response: { BodyOmitted: false } response, ExpiresAt: { } expiresAt })
        {
            return;
        }

        var size = EntryOverheadBytes + fingerprint.Length + response.Body.Length + ((key.Scope.Length + key.Key.Length) * sizeof(char))
            + (response.HeaderCount * (EntryOverheadBytes / 8)) + (response.HeaderChars * sizeof(char));
        var budget = options.Value.ReplayCacheBytes;
        if (size > budget / 16)
        {
            // One huge response would push out many small ones; the grain replays it as well.
            return;
        }

        // The silo's clock set the expiry; this process's clock reads it, from what the grain said was left where it
        // did (older silos do not), and from the expiry itself, whichever ends first. Stop a little early rather than
        // replay a record the silo already considers gone (and another node may already have run again).
        var now = time.GetUtcNow();
        var ends = completed.RetainedFor is { } left && now + left < expiresAt ? now + left : expiresAt;
        var entry = new Entry(fingerprint, response, ends - ClockSkewAllowance, size);
        if (entry.ExpiresAt <= now)
        {
            return;
        }
        if (!entries.TryAdd(key, entry))
        {
            return;
        }

        oldestFirst.Enqueue((key, entry));
        Interlocked.Add(ref bytes, size);
        while (Bytes > budget && oldestFirst.TryDequeue(out var oldest))
        {
            // Only this very entry: the key may have expired and been added again since.
            entries.TryRemove(new KeyValuePair<IdempotencyKey, Entry>(oldest.Key, oldest.Entry));
            Interlocked.Add(ref bytes, -oldest.Entry.Size);
        }
    }

    private sealed record Entry(byte[] Fingerprint, StoredResponse Response, DateTimeOffset ExpiresAt, long Size);
}
