using System.IO.Hashing;
using System.Numerics;

namespace OrleansIdempotency.Silo.Storage;

/// <summary>
/// The in-memory store's records, without an object per record: their bytes packed into large shared segments
/// (<see cref="RecordSegments"/>), found by key through open-addressing arrays of plain structs. Neither holds a
/// reference, so a garbage collection neither walks nor copies what they hold.
/// </summary>
/// <remarks>
/// <para>
/// Why: held as a dictionary node, a key array and a payload array, hundreds of thousands of records were three
/// objects each that every collection promoted and every full collection walked; measured, that was most of what
/// the embedded default added to a new key beyond Orleans' own work (docs/performance.md, "Embedded").
/// </para>
/// <para>
/// The keys are split over 64 shards by their hash, each with its own lock and slots, so that growing a shard holds
/// up only its own keys, for a 64th of the time one table of millions would (145 ms at 1.5 million records, measured).
/// Every operation is one probe in one shard and a copy of at most one record. <see cref="Purge"/> also moves the
/// few live records out of mostly dead segments, so that one long-lived record cannot hold a whole segment. Keys
/// come from clients, so the hash is seeded per table: nobody can choose keys that all land in one probe sequence.
/// </para>
/// </remarks>
internal sealed class RecordTable
{
    // The shard is the hash's top bits, the slot within it the low bits.
    private const int ShardBits = 6;

    // Purge holds a shard's lock for this many slots at a time: a scan of millions must not hold up requests.
    private const int PurgeChunk = 16 * 1024;

    private const int MinimumCapacity = 64;

    private readonly KeyHash hash;
    private readonly RecordSegments segments;
    private readonly Shard[] shards;
    private long lastVersion;

    public RecordTable()
        : this(SeededHash())
    {
    }

    /// <summary>
    /// A table with the given hash (for tests that make keys collide) and the given allocation of segments (for tests
    /// that run out of memory).
    /// </summary>
    internal RecordTable(KeyHash hash, Func<int, byte[]>? allocate = null)
    {
        this.hash = hash;
        segments = new RecordSegments(allocate);
        shards = Enumerable.Range(0, 1 << ShardBits).Select(_ => new Shard()).ToArray();
    }

    internal delegate ulong KeyHash(ReadOnlySpan<byte> key);

    private enum SlotState : byte
    {
        Empty,
        Used,
        // Its record was removed: a probe goes on past it, an insertion may take it.
        Removed,
    }

    /// <summary>How many records are held.</summary>
    public int Count => shards.Sum(shard => Volatile.Read(ref shard.Used));

    /// <summary>How many bytes the segments take, live or dead.</summary>
    public long SegmentBytes => segments.Bytes;

    /// <summary>How many bytes the live records take: their keys and payloads.</summary>
    public long LiveBytes => segments.LiveBytes;

    /// <summary>How many segments were allocated rather than reused (for tests of their reuse).</summary>
    internal int SegmentsAllocated => segments.Allocated;

    /// <summary>How many slots the shards have together (for tests of their growth and shrinking).</summary>
    internal int Capacity => shards.Sum(shard =>
    {
        lock (shard.Gate)
        {
            return shard.Slots.Length;
        }
    });

    public bool Contains(ReadOnlySpan<byte> key)
    {
        var shard = ShardOf(key, out var keyHash);
        lock (shard.Gate)
        {
            return Find(shard, key, keyHash, out _) >= 0;
        }
    }

    /// <summary>Copies out the record's payload and its version.</summary>
    public bool TryRead(ReadOnlySpan<byte> key, out byte[] payload, out long version)
    {
        var shard = ShardOf(key, out var keyHash);
        lock (shard.Gate)
        {
            var index = Find(shard, key, keyHash, out _);
            if (index < 0)
            {
                (payload, version) = ([], 0);
                return false;
            }

            ref var slot = ref shard.Slots[index];
            payload = segments.Read(slot.Segment, slot.Offset + slot.KeyLength, slot.PayloadLength).ToArray();
            version = slot.Version;
            return true;
        }
    }

    /// <summary>
    /// Adds a record for a key that has none; its version is new, never issued before by this table. A record
    /// <paramref name="shortLived"/> will be replaced within moments (a claim, by its completion).
    /// </summary>
    public bool TryAdd(ReadOnlySpan<byte> key, ReadOnlySpan<byte> payload, long expiresAtUtcTicks, bool shortLived, out long version)
    {
        var shard = ShardOf(key, out var keyHash);
        lock (shard.Gate)
        {
            if (Find(shard, key, keyHash, out var free) >= 0)
            {
                version = 0;
                return false;
            }

            if ((shard.Used + shard.Removed + 1) * 10 > shard.Slots.Length * 7)
            {
                Resize(shard, CapacityFor(shard.Used + 1));
                Find(shard, key, keyHash, out free);
            }

            // First what may fail (a segment the process has no memory for): the table is then left as it was.
            var at = segments.Append(key, payload, shortLived);
            ref var slot = ref shard.Slots[free];
            if (slot.State == SlotState.Removed)
            {
                shard.Removed--;
            }

            Volatile.Write(ref shard.Used, shard.Used + 1);
            slot = new Slot { State = SlotState.Used, Hash = keyHash, KeyLength = key.Length };
            Place(ref slot, at, payload.Length, expiresAtUtcTicks);
            version = slot.Version;
            return true;
        }
    }

    /// <summary>
    /// Replaces the record if it is still at <paramref name="expectedVersion"/>; the new one gets a new version. A
    /// record <paramref name="shortLived"/> will be replaced within moments (a claim, by its completion).
    /// </summary>
    public bool TryReplace(ReadOnlySpan<byte> key, long expectedVersion, ReadOnlySpan<byte> payload, long expiresAtUtcTicks, bool shortLived, out long version)
    {
        var shard = ShardOf(key, out var keyHash);
        lock (shard.Gate)
        {
            var index = FindAt(shard, key, keyHash, expectedVersion);
            if (index < 0)
            {
                version = 0;
                return false;
            }

            var at = segments.Append(key, payload, shortLived);
            ref var slot = ref shard.Slots[index];
            Release(slot);
            Place(ref slot, at, payload.Length, expiresAtUtcTicks);
            version = slot.Version;
            return true;
        }
    }

    /// <summary>Removes the record if it is still at <paramref name="expectedVersion"/>.</summary>
    public bool TryRemove(ReadOnlySpan<byte> key, long expectedVersion)
    {
        var shard = ShardOf(key, out var keyHash);
        lock (shard.Gate)
        {
            var index = FindAt(shard, key, keyHash, expectedVersion);
            if (index < 0)
            {
                return false;
            }

            Remove(shard, ref shard.Slots[index]);
            return true;
        }
    }

    /// <summary>
    /// Drops every record that expires at or before <paramref name="nowUtcTicks"/>, then moves the live records out of
    /// mostly dead segments, and shrinks the shards left mostly empty.
    /// </summary>
    public void Purge(long nowUtcTicks)
    {
        ForEachRecord((Shard shard, ref Slot slot) =>
        {
            if (slot.ExpiresAtUtcTicks <= nowUtcTicks)
            {
                Remove(shard, ref slot);
            }
        });

        var sparse = segments.Sparse();
        if (sparse.Count > 0)
        {
            ForEachRecord((Shard _, ref Slot slot) =>
            {
                if (sparse.Contains(slot.Segment) && segments.IsSparse(slot.Segment))
                {
                    Move(ref slot);
                }
            });
        }

        foreach (var shard in shards)
        {
            lock (shard.Gate)
            {
                if (shard.Slots.Length > MinimumCapacity && shard.Used * 8 < shard.Slots.Length)
                {
                    Resize(shard, CapacityFor(shard.Used));
                }
            }
        }
    }

    private static KeyHash SeededHash()
    {
        var seed = Random.Shared.NextInt64();
        return key => XxHash3.HashToUInt64(key, seed);
    }

    // A power of two at which the records fill at most half the slots; a shard resizes when 70 % are used or
    // removed. Linear probing stays short below that with a good hash, and a slot is 48 bytes a record pays for.
    private static int CapacityFor(int records) =>
        Math.Max(MinimumCapacity, checked((int)BitOperations.RoundUpToPowerOf2((uint)records * 2)));

    private Shard ShardOf(ReadOnlySpan<byte> key, out ulong keyHash)
    {
        keyHash = hash(key);
        return shards[(int)(keyHash >> (64 - ShardBits))];
    }

    /// <returns>The index of the key's slot if its record is at <paramref name="version"/>, or -1.</returns>
    private int FindAt(Shard shard, ReadOnlySpan<byte> key, ulong keyHash, long version)
    {
        var index = Find(shard, key, keyHash, out _);
        return index >= 0 && shard.Slots[index].Version == version ? index : -1;
    }

    /// <returns>The index of the key's slot, or -1 with <paramref name="free"/> the slot an insertion would take.</returns>
    private int Find(Shard shard, ReadOnlySpan<byte> key, ulong keyHash, out int free)
    {
        free = -1;
        var slots = shard.Slots;
        var mask = slots.Length - 1;
        // At most 70 % of the slots are used or removed (see TryAdd), so every probe reaches an empty one.
        for (var index = (int)(keyHash & (ulong)mask); ; index = (index + 1) & mask)
        {
            ref var slot = ref slots[index];
            switch (slot.State)
            {
                case SlotState.Empty:
                    free = free < 0 ? index : free;
                    return -1;
                case SlotState.Removed:
                    free = free < 0 ? index : free;
                    break;
                default:
                    if (slot.Hash == keyHash && segments.Read(slot.Segment, slot.Offset, slot.KeyLength).SequenceEqual(key))
                    {
                        return index;
                    }

                    break;
            }
        }
    }

    private static void Resize(Shard shard, int capacity)
    {
        var slots = new Slot[capacity];
        var mask = capacity - 1;
        foreach (var slot in shard.Slots)
        {
            if (slot.State == SlotState.Used)
            {
                var index = (int)(slot.Hash & (ulong)mask);
                while (slots[index].State != SlotState.Empty)
                {
                    index = (index + 1) & mask;
                }

                slots[index] = slot;
            }
        }

        shard.Slots = slots;
        shard.Removed = 0;
    }

    // Holds a shard's lock a chunk of slots at a time. A shard resized between chunks is scanned on from the same
    // index: a record missed is seen by the next purge, one seen twice is judged twice the same way.
    private void ForEachRecord(RecordAction action)
    {
        foreach (var shard in shards)
        {
            for (var start = 0; ; start += PurgeChunk)
            {
                lock (shard.Gate)
                {
                    if (start >= shard.Slots.Length)
                    {
                        break;
                    }

                    for (var index = start; index < Math.Min(start + PurgeChunk, shard.Slots.Length); index++)
                    {
                        if (shard.Slots[index].State == SlotState.Used)
                        {
                            action(shard, ref shard.Slots[index]);
                        }
                    }
                }
            }
        }
    }

    private void Place(ref Slot slot, (int Segment, int Offset) at, int payloadLength, long expiresAtUtcTicks)
    {
        (slot.Segment, slot.Offset) = at;
        slot.PayloadLength = payloadLength;
        slot.ExpiresAtUtcTicks = expiresAtUtcTicks;
        slot.Version = Interlocked.Increment(ref lastVersion);
    }

    private void Remove(Shard shard, ref Slot slot)
    {
        Release(slot);
        slot = new Slot { State = SlotState.Removed };
        Volatile.Write(ref shard.Used, shard.Used - 1);
        shard.Removed++;
    }

    // A record keeps its version where it moves: the move changes where it is, not what it is. What is still there
    // when its segment is mostly dead has outlived its neighbours, so it goes among the long-lived.
    private void Move(ref Slot slot)
    {
        var record = segments.Read(slot.Segment, slot.Offset, slot.KeyLength + slot.PayloadLength);
        var (segment, offset) = segments.Append(record[..slot.KeyLength], record[slot.KeyLength..], isShortLived: false);
        Release(slot);
        (slot.Segment, slot.Offset) = (segment, offset);
    }

    private void Release(in Slot slot) => segments.Release(slot.Segment, slot.KeyLength + slot.PayloadLength);

    private delegate void RecordAction(Shard shard, ref Slot slot);

    private sealed class Shard
    {
        public readonly Lock Gate = new();
        public Slot[] Slots = new Slot[MinimumCapacity];
        public int Used;
        public int Removed;
    }

    private struct Slot
    {
        public SlotState State;
        public ulong Hash;
        public int Segment;
        public int Offset;
        public int KeyLength;
        public int PayloadLength;
        public long Version;
        public long ExpiresAtUtcTicks;
    }
}
