namespace OrleansIdempotency.Silo.Storage;

/// <summary>
/// The bytes of <see cref="RecordTable"/>'s records (each its key, then its payload), packed into large shared
/// segments: arrays of bytes that a garbage collection neither walks (they hold no references) nor copies (they are
/// large objects). A record rewritten or removed leaves its old bytes dead in their segment; a segment without live
/// bytes is let go, or kept as the spare the next segment reuses.
/// </summary>
/// <remarks>
/// Appending and releasing take this class's lock. Reading does not: a record's bytes never change while it is
/// live, and its segment is not let go before it is released, so whoever holds the record (under its shard's lock)
/// may read them. For the same reason a segment can be reused once it has no live bytes: no reader can be in it.
/// </remarks>
internal sealed class RecordSegments
{
    /// <summary>The size of a shared segment. A record larger than a quarter of it gets a segment of its own.</summary>
    public const int SegmentSize = 1 << 20;

    private const int LargeRecord = SegmentSize / 4;

    // A shared segment whose live bytes fell below this is sparse: purging moves its records out.
    private const int SparseBelow = SegmentSize / 4;

    private readonly Lock gate = new();
    private readonly Func<int, byte[]> allocate;
    private readonly Stack<int> unused = new();
    private readonly List<int> liveBytes = [];

    // Claims are replaced by their completion within moments, the rest stays for its retention: written to segments
    // of their own, claims die a segment at a time instead of leaving a quarter of every segment dead.
    private readonly AppendPoint longLived = new();
    private readonly AppendPoint shortLived = new();

    // Replaced, never resized in place, so that a reader without the lock sees a whole array.
    private volatile byte[]?[] segments = new byte[]?[16];
    private int count;
    private long live;
    private long bytes;

    // The last shared segment let go, for the next one. Claims fill a segment every few thousand keys and let it go
    // moments later; a new one each time is a large-object allocation, which brings the next full garbage collection
    // closer, and a page fault every 4 KB as it is first written (copying into segments: 1.5 % of an embedded new
    // key's CPU in the kernel, claims and completions together).
    private byte[]? spare;

    /// <param name="allocate">Allocates a segment's bytes, uninitialized unless a test says otherwise.</param>
    public RecordSegments(Func<int, byte[]>? allocate = null)
    {
        this.allocate = allocate ?? (size => GC.AllocateUninitializedArray<byte>(size));
    }

    /// <summary>How many bytes the segments take, live or dead, the spare included.</summary>
    public long Bytes => Volatile.Read(ref bytes);

    /// <summary>How many bytes the live records take (their keys and payloads), not the dead bytes their segments also hold.</summary>
    public long LiveBytes => Volatile.Read(ref live);

    /// <summary>How many segments were allocated, not reused (for tests of their reuse).</summary>
    internal int Allocated { get; private set; }

    /// <summary>The bytes of a live record, as <see cref="Append"/> placed them.</summary>
    public ReadOnlySpan<byte> Read(int segment, int offset, int length) => segments[segment]!.AsSpan(offset, length);

    /// <summary>Copies a record in; <paramref name="isShortLived"/> for one that will be replaced within moments.</summary>
    public (int Segment, int Offset) Append(ReadOnlySpan<byte> key, ReadOnlySpan<byte> payload, bool isShortLived)
    {
        var length = key.Length + payload.Length;
        lock (gate)
        {
            int segment, offset;
            if (length > LargeRecord)
            {
                (segment, offset) = (Add(length), 0);
            }
            else
            {
                var at = isShortLived ? shortLived : longLived;
                if (at.Segment < 0 || at.Offset + length > SegmentSize)
                {
                    var full = at.Segment;
                    (at.Segment, at.Offset) = (Add(SegmentSize), 0);
                    if (full >= 0 && liveBytes[full] == 0)
                    {
                        Free(full);
                    }
                }

                (segment, offset) = (at.Segment, at.Offset);
                at.Offset += length;
            }

            var bytes = segments[segment]!.AsSpan(offset, length);
            key.CopyTo(bytes);
            payload.CopyTo(bytes[key.Length..]);
            liveBytes[segment] += length;
            Volatile.Write(ref live, live + length);
            return (segment, offset);
        }
    }

    /// <summary>Marks a record's bytes dead; the segment goes when none of its bytes live.</summary>
    public void Release(int segment, int length)
    {
        lock (gate)
        {
            Volatile.Write(ref live, live - length);
            if ((liveBytes[segment] -= length) == 0 && !IsAppendedTo(segment))
            {
                Free(segment);
            }
        }
    }

    /// <summary>The shared segments, not being appended to, whose live bytes are too few to keep them.</summary>
    public HashSet<int> Sparse()
    {
        lock (gate)
        {
            return Enumerable.Range(0, count).Where(IsSparse).ToHashSet();
        }
    }

    /// <summary>Whether the segment is still sparse: its number may have gone to a new segment since it was found so.</summary>
    public bool IsSparse(int segment)
    {
        lock (gate)
        {
            return !IsAppendedTo(segment) && segments[segment]?.Length == SegmentSize && liveBytes[segment] < SparseBelow;
        }
    }

    private bool IsAppendedTo(int segment) => segment == longLived.Segment || segment == shortLived.Segment;

    // Everything that may fail (allocations) comes before anything changes: a segment the process has no memory for
    // leaves the segments as they were. The stack of unused numbers is kept large enough for all of them, so that
    // freeing a segment never allocates.
    private int Add(int size)
    {
        var fresh = unused.Count == 0;
        if (fresh)
        {
            if (count == segments.Length)
            {
                var grown = new byte[]?[segments.Length * 2];
                segments.CopyTo(grown);
                segments = grown;
            }

            liveBytes.EnsureCapacity(count + 1);
            unused.EnsureCapacity(count + 1);
        }

        // Reused as it was, or uninitialized: every byte of it is written before it is read.
        byte[] added;
        if (spare is { } kept && kept.Length == size)
        {
            (added, spare) = (kept, null);
        }
        else
        {
            added = allocate(size);
            Allocated++;
            Volatile.Write(ref bytes, bytes + size);
        }

        int segment;
        if (fresh)
        {
            segment = count++;
            liveBytes.Add(0);
        }
        else
        {
            segment = unused.Pop();
        }

        segments[segment] = added;
        return segment;
    }

    private void Free(int segment)
    {
        // Kept as the spare, in place of the one before if any; else (a large record's) let go.
        var freed = segments[segment]!;
        var letGo = freed.Length == SegmentSize ? spare : freed;
        if (freed.Length == SegmentSize)
        {
            spare = freed;
        }

        Volatile.Write(ref bytes, bytes - (letGo?.Length ?? 0));

        segments[segment] = null;
        unused.Push(segment);
    }

    private sealed class AppendPoint
    {
        public int Segment = -1;
        public int Offset;
    }
}
