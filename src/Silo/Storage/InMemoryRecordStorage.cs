using System.Buffers;
using System.Globalization;
using System.Text;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Orleans.Storage;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.Silo.Storage;

/// <summary>
/// The embedded default's records: in this silo's memory, with the ETag contract of PostgreSQL's (a write without an
/// ETag creates and never overwrites, a write with one changes only that version) and its purge: a record is
/// dropped at <see cref="IdempotencyRecord.PurgeableAt"/>, so memory holds only records within their retention.
/// Unlike PostgreSQL it has no late-write check: a write here lands within the grain's turn or not at all.
/// </summary>
/// <remarks>
/// Each record is kept as its serialized bytes (in a <see cref="RecordTable"/>), so no grain ever shares an object
/// with the store. ETags are the table's versions, never reused: an activation still holding the ETag of a purged
/// record cannot match the record created after it. Per process: several silos would each hold their own records,
/// so the hosting refuses a cluster (Redis) without PostgreSQL;
/// <see cref="Hosting.IdempotencySiloBuilderExtensions.AddIdempotencyMemoryStorage"/> is for a single silo only.
/// </remarks>
public sealed partial class InMemoryRecordStorage : IGrainStorage, IDisposable
{
    /// <summary>How often expired records are dropped.</summary>
    public static readonly TimeSpan PurgeInterval = TimeSpan.FromMinutes(1);

    // Keys longer than this (long idempotency keys in long scopes) are built on the heap instead of the stack.
    private const int StackKeyLength = 256;

    // A serialized record is copied into the table at once, so each thread serializes into one buffer of its own;
    // a buffer grown past this by a large response is let go rather than kept for the thread's life.
    private const int KeptBufferCapacity = 64 * 1024;

    [ThreadStatic]
    private static ArrayBufferWriter<byte>? serializeBuffer;

    private readonly RecordTable records;
    private readonly IdempotencyStorageSerializer serializer;
    private readonly TimeProvider time;
    private readonly ITimer purge;
    private readonly long maxBytes;
    private readonly long maxSegmentBytes;
    private readonly ILogger logger;
    private int purging;
    private long compactNotBefore;

    /// <param name="serializer">How records are written.</param>
    /// <param name="time">The clock records expire by.</param>
    /// <param name="maxBytes">
    /// The most bytes of records held (keys and payloads) before a new key is refused; by default an eighth of the
    /// GC's memory limit (in a container, 75 % of its memory limit unless set; else the machine's memory). An eighth:
    /// the segments holding records may be as little as a quarter live before the purge compacts them.
    /// </param>
    /// <param name="logger">Where a purge that failed is reported.</param>
    public InMemoryRecordStorage(IdempotencyStorageSerializer serializer, TimeProvider time, long? maxBytes = null, ILogger<InMemoryRecordStorage>? logger = null)
        : this(serializer, time, maxBytes, logger, new RecordTable())
    {
    }

    /// <summary>A store over the given table: for tests whose table runs out of memory.</summary>
    internal InMemoryRecordStorage(IdempotencyStorageSerializer serializer, TimeProvider time, long? maxBytes, ILogger? logger, RecordTable records)
    {
        this.serializer = serializer;
        this.time = time;
        this.maxBytes = maxBytes ?? GC.GetGCMemoryInfo().TotalAvailableMemoryBytes / 8;
        // Segments at least a quarter live, and the three a store always has (the two appended to, the spare).
        const long alwaysHeld = 3L * RecordSegments.SegmentSize;
        maxSegmentBytes = this.maxBytes > (long.MaxValue - alwaysHeld) / 4 ? long.MaxValue : (4 * this.maxBytes) + alwaysHeld;
        this.logger = logger ?? NullLogger.Instance;
        this.records = records;
        purge = time.CreateTimer(_ => PurgeOnSchedule(), null, PurgeInterval, PurgeInterval);
    }

    /// <summary>How many records are held, expired or not.</summary>
    public int Count => records.Count;

    public Task ReadStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState)
    {
        if (records.TryRead(WriteKey(stateName, grainId, stackalloc byte[StackKeyLength]), out var payload, out var version))
        {
            grainState.State = serializer.Deserialize<T>(new BinaryData(payload));
            grainState.ETag = version.ToString(CultureInfo.InvariantCulture);
            grainState.RecordExists = true;
        }
        else
        {
            grainState.State = Activator.CreateInstance<T>();
            grainState.ETag = null;
            grainState.RecordExists = false;
        }

        return Task.CompletedTask;
    }

    public Task WriteStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState)
    {
        var key = WriteKey(stateName, grainId, stackalloc byte[StackKeyLength]);
        var buffer = serializeBuffer ??= new ArrayBufferWriter<byte>(1024);
        buffer.ResetWrittenCount();
        serializer.Serialize(grainState.State, buffer);
        var payload = buffer.WrittenSpan;
        var record = grainState.State as IdempotencyRecord;
        var expiresAt = (record?.PurgeableAt ?? DateTimeOffset.MaxValue).UtcTicks;
        var claim = record?.Status == IdempotencyStatus.InProgress;
        long version = 0;
        // A new key beyond the bound is refused (its caller answers 503: nothing runs without a claim) rather than the
        // process running out of memory and forgetting every key; the keys held still complete, renew and replay, and
        // a free key's record (a release's, kept for a lease) is let in, or that release would be retried for a day.
        if (grainState.ETag is null && record?.Status != IdempotencyStatus.None)
        {
            if (records.LiveBytes is var held && held + key.Length + payload.Length > maxBytes && !records.Contains(key))
            {
                throw new IOException(
                    $"The in-memory idempotency store holds {held} bytes of records, its bound of {maxBytes}: new keys are refused " +
                    "until records expire. Set ConnectionStrings__Postgres for durable storage that is bounded by its disk.");
            }

            if (records.SegmentBytes > maxSegmentBytes)
            {
                CompactSoon();
            }
        }

        var written = grainState.ETag is null
            ? records.TryAdd(key, payload, expiresAt, claim, out version)
            : TryParseIssued(grainState.ETag, out var expected) && records.TryReplace(key, expected, payload, expiresAt, claim, out version);
        if (buffer.Capacity > KeptBufferCapacity)
        {
            serializeBuffer = null;
        }

        if (!written)
        {
            throw Conflict("write", grainId, grainState.ETag);
        }

        grainState.ETag = version.ToString(CultureInfo.InvariantCulture);
        grainState.RecordExists = true;
        return Task.CompletedTask;
    }

    public Task ClearStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState)
    {
        var key = WriteKey(stateName, grainId, stackalloc byte[StackKeyLength]);
        var cleared = grainState.ETag is null
            ? !records.Contains(key)
            : TryParseIssued(grainState.ETag, out var expected) && records.TryRemove(key, expected);
        if (!cleared)
        {
            throw Conflict("clear", grainId, grainState.ETag);
        }

        grainState.State = Activator.CreateInstance<T>();
        grainState.ETag = null;
        grainState.RecordExists = false;
        return Task.CompletedTask;
    }

    public void Dispose() => purge.Dispose();

    /// <summary>Drops every record past <see cref="IdempotencyRecord.PurgeableAt"/>; a record rewritten meanwhile is kept.</summary>
    public void Purge() => records.Purge(time.GetUtcNow().UtcTicks);

    // The bound counts live bytes; the segments holding them are held to four times that by the purge, which moves the
    // records out of mostly dead segments. Between purges claims that never complete (a Once API worker that died, an
    // action that outlives its client's process) each keep a whole segment of claims long since completed: at tens of
    // thousands of new keys a second, hundreds of megabytes a minute. Past that a new key's write starts the purge at
    // once, off the grain's turn (a scan of millions of records takes a while) and without the request's context, and
    // is taken meanwhile, as are others: the store has room for them. At most once a second, so that a purge that
    // keeps failing (no memory to move records into) is not a scan for every new key.
    private void CompactSoon()
    {
        var now = time.GetUtcNow().UtcTicks;
        if (now < Volatile.Read(ref compactNotBefore) || Interlocked.CompareExchange(ref purging, 1, 0) != 0)
        {
            return;
        }

        Volatile.Write(ref compactNotBefore, now + TimeSpan.TicksPerSecond);
        try
        {
            ThreadPool.UnsafeQueueUserWorkItem(_ => PurgeHeld(), null);
        }
        catch
        {
            Volatile.Write(ref purging, 0);
            throw;
        }
    }

    // One purge at a time: the minute's is skipped while one started by a new key runs, and vice versa.
    private void PurgeOnSchedule()
    {
        if (Interlocked.CompareExchange(ref purging, 1, 0) == 0)
        {
            PurgeHeld();
        }
    }

    // Thrown from a timer, a purge's failure (no memory for a segment to move records into) would end the process, and
    // every record with it: it is reported, and the next interval tries again.
    private void PurgeHeld()
    {
        try
        {
            Purge();
        }
        catch (Exception ex)
        {
            LogPurgeFailed(logger, ex);
        }
        finally
        {
            Volatile.Write(ref purging, 0);
        }
    }

    [LoggerMessage(Level = LogLevel.Error, Message = "Purging expired in-memory idempotency records failed; the next purge tries again.")]
    private static partial void LogPurgeFailed(ILogger logger, Exception exception);

    // The state name and the grain type, each after its length, then the grain's own key: no two (state, grain)
    // pairs share the bytes. Written into the destination, or into a new array if it is too short.
    private static ReadOnlySpan<byte> WriteKey(string stateName, GrainId grainId, Span<byte> destination)
    {
        var type = grainId.Type.AsSpan();
        var id = grainId.Key.AsSpan();
        var nameLength = Encoding.UTF8.GetByteCount(stateName);
        var length = (2 * sizeof(int)) + nameLength + type.Length + id.Length;
        var key = length <= destination.Length ? destination[..length] : new byte[length];
        var rest = key;
        BitConverter.TryWriteBytes(rest, nameLength);
        rest = rest[(sizeof(int) + Encoding.UTF8.GetBytes(stateName, rest[sizeof(int)..]))..];
        BitConverter.TryWriteBytes(rest, type.Length);
        type.CopyTo(rest[sizeof(int)..]);
        id.CopyTo(rest[(sizeof(int) + type.Length)..]);
        return key;
    }

    // Only the text this store issued matches: a version's digits, nothing else ("01", " 1", "-1" are not 1).
    private static bool TryParseIssued(string etag, out long version) =>
        long.TryParse(etag, NumberStyles.None, CultureInfo.InvariantCulture, out version) && version > 0 && etag[0] != '0';

    private static InconsistentStateException Conflict(string operation, GrainId grainId, string? etag) =>
        new($"The {operation} of {grainId} expected version {etag ?? "(none)"}, which is not the stored one.");
}
