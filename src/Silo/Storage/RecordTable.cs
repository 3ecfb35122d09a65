using System.IO.Hashing;
using System.Numerics;

namespace OrleansIdempotency.Silo.Storage;

/// <summary>
/// The in-memory store's records, without an object per record: each record's bytes (its key, then its payload) are
/// packed into large shared segments, and one open-addressing array of plain structs finds them by key. Neither holds
/// a reference, so a garbage collection neither walks nor copies what they hold.
/// </summary>
/// <remarks>
/// <para>
/// Why: held as a dictionary node, a key array and a payload array, hundreds of thousands of records were three
/// objects each that every collection promoted and every full collection walked; measured, that was most of what
/// the embedded default added to a new key beyond Orleans' own work (README, "Performance").
/// </para>
/// <para>
/// Thread-safe under one lock; every operation is one probe and a copy of at most one record. A record rewritten or
/// removed leaves its old bytes dead in their segment; a segment without live bytes is let go, and
/// <see cref="Purge"/> moves the few live records out of a mostly dead one, so that one long-lived record cannot
/// hold a whole segment. Keys come from clients, so the hash is seeded per table: nobody can choose keys that all
/// land in one probe sequence.
/// </para>
/// </remarks>
internal sealed class RecordTable
{
    /// <summary>The size of a shared segment. A record larger than a quarter of it gets a segment of its own.</summary>
    public const int SegmentSize = 1 << 20;

    private const int LargeRecord = SegmentSize / 4;

    // Purge moves the records out of a shared segment whose live bytes fell below this.
    private const int SparseSegment = SegmentSize / 4;

    private const int PurgeChunk = 16 * 1024;

    private const int MinimumCapacity = 1024;

    private readonly Lock gate = new();
    private readonly KeyHash hash;
    private readonly List<byte[]?> segments = [];
    private readonly List<int> segmentLiveBytes = [];
    private readonly Stack<int> unusedSegments = new();
    private Slot[] slots = new Slot[MinimumCapacity];
    private int used;
    private int removed;
    // Claims are replaced by their completion within moments, the rest stays for its retention: written to segments
    // of their own, claims die a segment at a time instead of leaving a quarter of every segment dead.
    private readonly AppendPoint longLivedAppend = new();
    private readonly AppendPoint shortLivedAppend = new();
    private long lastVersion;

    public RecordTable()
        : this(SeededHash())
    {
    }

    /// <summary>A table with the given hash: for tests that make keys collide.</summary>
    internal RecordTable(KeyHash hash) => this.hash = hash;

    internal delegate ulong KeyHash(ReadOnlySpan<byte> key);

    private delegate void RecordAction(ref Slot slot);

    private enum SlotState : byte
    {
        Empty,
        Used,
        // Its record was removed: a probe goes on past it, an insertion may take it.
        Removed,
    }

    /// <summary>How many records are held.</summary>
    public int Count
    {
        get
        {
            lock (gate)
            {
                return used;
            }
        }
    }

    /// <summary>How many bytes the segments take, live or dead.</summary>
    public long SegmentBytes
    {
        get
        {
            lock (gate)
            {
                return segments.Sum(segment => (long)(segment?.Length ?? 0));
            }
        }
    }

    /// <summary>How many slots the table has (for tests of its growth and shrinking).</summary>
    internal int Capacity
    {
        get
        {
            lock (gate)
            {
                return slots.Length;
            }
        }
    }

    public bool Contains(ReadOnlySpan<byte> key)
    {
        var keyHash = hash(key);
        lock (gate)
        {
            return Find(key, keyHash, out _) >= 0;
        }
    }

    /// <summary>Copies out the record's payload and its version.</summary>
    public bool TryRead(ReadOnlySpan<byte> key, out byte[] payload, out long version)
    {
        var keyHash = hash(key);
        lock (gate)
        {
            var index = Find(key, keyHash, out _);
            if (index < 0)
            {
                (payload, version) = ([], 0);
                return false;
            }

            ref var slot = ref slots[index];
            payload = segments[slot.Segment]!.AsSpan(slot.Offset + slot.KeyLength, slot.PayloadLength).ToArray();
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
        var keyHash = hash(key);
        lock (gate)
        {
            if (Find(key, keyHash, out var free) >= 0)
            {
                version = 0;
                return false;
            }

            if ((used + removed + 1) * 10 > slots.Length * 7)
            {
                Resize(CapacityFor(used + 1));
                Find(key, keyHash, out free);
            }

            if (slots[free].State == SlotState.Removed)
            {
                removed--;
            }

            used++;
            ref var slot = ref slots[free];
            slot = new Slot { State = SlotState.Used, Hash = keyHash, KeyLength = key.Length };
            Store(ref slot, key, payload, expiresAtUtcTicks, shortLived);
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
        var keyHash = hash(key);
        lock (gate)
        {
            var index = Find(key, keyHash, out _);
            if (index < 0 || slots[index].Version != expectedVersion)
            {
                version = 0;
                return false;
            }

            ref var slot = ref slots[index];
            Release(slot);
            Store(ref slot, key, payload, expiresAtUtcTicks, shortLived);
            version = slot.Version;
            return true;
        }
    }

    /// <summary>Removes the record if it is still at <paramref name="expectedVersion"/>.</summary>
    public bool TryRemove(ReadOnlySpan<byte> key, long expectedVersion)
    {
        var keyHash = hash(key);
        lock (gate)
        {
            var index = Find(key, keyHash, out _);
            if (index < 0 || slots[index].Version != expectedVersion)
            {
                return false;
            }

            Remove(ref slots[index]);
            return true;
        }
    }

    /// <summary>
    /// Drops every record that expires at or before <paramref name="nowUtcTicks"/>, then moves the live records out of
    /// mostly dead segments, and shrinks the table if it is mostly empty.
    /// </summary>
    public void Purge(long nowUtcTicks)
    {
        ForEachRecord((ref slot) =>
        {
            if (slot.ExpiresAtUtcTicks <= nowUtcTicks)
            {
                Remove(ref slot);
            }
        });

        HashSet<int> sparse;
        lock (gate)
        {
            sparse = Enumerable.Range(0, segments.Count)
                .Where(s => !IsAppendedTo(s) && segments[s]?.Length == SegmentSize && segmentLiveBytes[s] < SparseSegment)
                .ToHashSet();
        }

        if (sparse.Count > 0)
        {
            ForEachRecord((ref slot) =>
            {
                // A sparse segment's number may have gone to a new segment since it was let go; that one stays.
                if (sparse.Contains(slot.Segment) && !IsAppendedTo(slot.Segment) && segments[slot.Segment]!.Length == SegmentSize)
                {
                    Move(ref slot);
                }
            });
        }

        lock (gate)
        {
            if (slots.Length > MinimumCapacity && used * 8 < slots.Length)
            {
                Resize(CapacityFor(used));
            }
        }
    }

    // Holds the lock a chunk of slots at a time: a scan of millions must not hold up requests. A table resized
    // between chunks is scanned on from the same index: a record missed is seen by the next purge, one seen twice
    // is judged twice the same way.
    private void ForEachRecord(RecordAction action)
    {
        for (var start = 0; ; start += PurgeChunk)
        {
            lock (gate)
            {
                if (start >= slots.Length)
                {
                    return;
                }

                for (var index = start; index < Math.Min(start + PurgeChunk, slots.Length); index++)
                {
                    if (slots[index].State == SlotState.Used)
                    {
                        action(ref slots[index]);
                    }
                }
            }
        }
    }

    private static KeyHash SeededHash()
    {
        var seed = Random.Shared.NextInt64();
        return key => XxHash3.HashToUInt64(key, seed);
    }

    // A power of two at which the records fill at most half the slots; the table resizes when 70 % are used or
    // removed. Linear probing stays short below that with a good hash, and a slot is 48 bytes a record pays for.
    private static int CapacityFor(int records) =>
        Math.Max(MinimumCapacity, checked((int)BitOperations.RoundUpToPowerOf2((uint)records * 2)));

    /// <returns>The index of the key's slot, or -1 with <paramref name="free"/> the slot an insertion would take.</returns>
    private int Find(ReadOnlySpan<byte> key, ulong keyHash, out int free)
    {
        free = -1;
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
                    if (slot.Hash == keyHash && segments[slot.Segment]!.AsSpan(slot.Offset, slot.KeyLength).SequenceEqual(key))
                    {
                        return index;
                    }

                    break;
            }
        }
    }

    private void Resize(int capacity)
    {
        var old = slots;
        slots = new Slot[capacity];
        var mask = capacity - 1;
        foreach (var slot in old)
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

        removed = 0;
    }

    private void Store(ref Slot slot, ReadOnlySpan<byte> key, ReadOnlySpan<byte> payload, long expiresAtUtcTicks, bool shortLived)
    {
        (slot.Segment, slot.Offset) = Append(key, payload, shortLived ? shortLivedAppend : longLivedAppend);
        slot.PayloadLength = payload.Length;
        slot.ExpiresAtUtcTicks = expiresAtUtcTicks;
        slot.Version = ++lastVersion;
    }

    private void Remove(ref Slot slot)
    {
        Release(slot);
        slot = new Slot { State = SlotState.Removed };
        used--;
        removed++;
    }

    // A record keeps its version where it moves: the move changes where it is, not what it is. What is still there
    // when its segment is mostly dead has outlived its neighbours, so it goes among the long-lived.
    private void Move(ref Slot slot)
    {
        var record = segments[slot.Segment]!.AsSpan(slot.Offset, slot.KeyLength + slot.PayloadLength);
        var (segment, offset) = Append(record[..slot.KeyLength], record[slot.KeyLength..], longLivedAppend);
        Release(slot);
        (slot.Segment, slot.Offset) = (segment, offset);
    }

    private (int Segment, int Offset) Append(ReadOnlySpan<byte> key, ReadOnlySpan<byte> payload, AppendPoint at)
    {
        var length = key.Length + payload.Length;
        int segment, offset;
        if (length > LargeRecord)
        {
            (segment, offset) = (NewSegment(length), 0);
        }
        else
        {
            if (at.Segment < 0 || at.Offset + length > SegmentSize)
            {
                var full = at.Segment;
                (at.Segment, at.Offset) = (NewSegment(SegmentSize), 0);
                if (full >= 0 && segmentLiveBytes[full] == 0)
                {
                    FreeSegment(full);
                }
            }

            (segment, offset) = (at.Segment, at.Offset);
            at.Offset += length;
        }

        var bytes = segments[segment]!.AsSpan(offset, length);
        key.CopyTo(bytes);
        payload.CopyTo(bytes[key.Length..]);
        segmentLiveBytes[segment] += length;
        return (segment, offset);
    }

    private bool IsAppendedTo(int segment) => segment == longLivedAppend.Segment || segment == shortLivedAppend.Segment;

    private void Release(in Slot slot)
    {
        if ((segmentLiveBytes[slot.Segment] -= slot.KeyLength + slot.PayloadLength) == 0 && !IsAppendedTo(slot.Segment))
        {
            FreeSegment(slot.Segment);
        }
    }

    private int NewSegment(int size)
    {
        // Uninitialized: every byte of it is written before it is read.
        var bytes = GC.AllocateUninitializedArray<byte>(size);
        if (unusedSegments.TryPop(out var segment))
        {
            segments[segment] = bytes;
            return segment;
        }

        segments.Add(bytes);
        segmentLiveBytes.Add(0);
        return segments.Count - 1;
    }

    private void FreeSegment(int segment)
    {
        segments[segment] = null;
        unusedSegments.Push(segment);
    }

    private sealed class AppendPoint
    {
        public int Segment = -1;
        public int Offset;
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
