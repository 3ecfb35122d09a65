using System.Buffers;

namespace OrleansIdempotency.Once;

/// <summary>
/// A request body read whole into pooled pieces: neither a contiguous buffer that copies itself each time it doubles
/// (a 10 MiB body held 16 MiB and passed through twice that), nor one the size a client announces before it sends it.
/// </summary>
internal sealed class PooledBody : IDisposable
{
    private const int PieceBytes = 64 * 1024;

    private readonly List<byte[]> pieces = [];
    private int lastPieceLength;

    /// <summary>The bytes read.</summary>
    public long Length { get; private set; }

    /// <summary>Reads <paramref name="body"/> to its end; null, read no further, once it passes <paramref name="maxBytes"/>.</summary>
    public static async Task<PooledBody?> ReadAsync(Stream body, long maxBytes, CancellationToken cancellationToken)
    {
        var read = new PooledBody();
        try
        {
            while (true)
            {
                if (read.pieces.Count == 0 || read.lastPieceLength == PieceBytes)
                {
                    read.pieces.Add(ArrayPool<byte>.Shared.Rent(PieceBytes));
                    read.lastPieceLength = 0;
                }

                var count = await body.ReadAsync(read.pieces[^1].AsMemory(read.lastPieceLength, PieceBytes - read.lastPieceLength), cancellationToken);
                if (count == 0)
                {
                    return read;
                }

                read.lastPieceLength += count;
                read.Length += count;
                if (read.Length > maxBytes)
                {
                    read.Dispose();
                    return null;
                }
            }
        }
        catch
        {
            read.Dispose();
            throw;
        }
    }

    /// <summary>The bytes, valid until this is disposed.</summary>
    public ReadOnlySequence<byte> ToSequence()
    {
        if (pieces.Count == 1)
        {
            return new ReadOnlySequence<byte>(pieces[0], 0, lastPieceLength);
        }

        var first = new Piece(pieces[0].AsMemory(0, PieceBytes), 0);
        var last = first;
        for (var i = 1; i < pieces.Count; i++)
        {
            last = last.Append(pieces[i].AsMemory(0, i == pieces.Count - 1 ? lastPieceLength : PieceBytes));
        }

        return new ReadOnlySequence<byte>(first, 0, last, last.Memory.Length);
    }

    public void Dispose()
    {
        foreach (var piece in pieces)
        {
            ArrayPool<byte>.Shared.Return(piece);
        }

        pieces.Clear();
    }

    private sealed class Piece : ReadOnlySequenceSegment<byte>
    {
        public Piece(ReadOnlyMemory<byte> memory, long runningIndex)
        {
            Memory = memory;
            RunningIndex = runningIndex;
        }

        public Piece Append(ReadOnlyMemory<byte> memory)
        {
            var next = new Piece(memory, RunningIndex + Memory.Length);
            Next = next;
            return next;
        }
    }
}
