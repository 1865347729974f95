"""Volume nodes and SimpleITK images: the one place where Slicer's RAS meets ITK's LPS.

Slicer stores a volume's geometry as an IJK-to-RAS matrix; ITK (and so the engine) stores origin, spacing and
direction in LPS. RAS = diag(-1, -1, 1) · LPS. Voxel arrays agree: both index (i, j, k) = (x, y, z), and numpy
views of either are (k, j, i). Uses only VTK and MRML classes, so it runs inside Slicer and on slicer-core.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def ijkToRasArrayFromImage(image: sitk.Image) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of an image's grid."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=float)
    return matrix


def geometryFromIjkToRasArray(matrix: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(origin, spacing, direction) in ITK's LPS convention from a 4x4 IJK-to-RAS matrix."""
    matrix = np.asarray(matrix, dtype=float)
    lps = LPS_TO_RAS @ matrix[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    origin = LPS_TO_RAS @ matrix[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def vtkMatrixFromArray(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def arrayFromVtkMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def vtkImageDataFromImage(image: sitk.Image) -> vtk.vtkImageData:
    """Voxels of a scalar image as vtkImageData (origin 0, spacing 1: geometry lives in the node's matrix)."""
    array = sitk.GetArrayFromImage(image)  # (k, j, i), i fastest in memory like VTK
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(image.GetSize())
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    imageData.GetPointData().SetScalars(scalars)
    return imageData


def setVolumeNodeFromImage(volumeNode, image: sitk.Image) -> None:
    """Fill a (scalar or labelmap) volume node with an image's voxels and geometry."""
    volumeNode.SetAndObserveImageData(vtkImageDataFromImage(image))
    volumeNode.SetIJKToRASMatrix(vtkMatrixFromArray(ijkToRasArrayFromImage(image)))


def imageFromVolumeNode(volumeNode) -> sitk.Image:
    """A SimpleITK image with the voxels and LPS geometry of a volume node (parent transforms not applied)."""
    imageData = volumeNode.GetImageData()
    if imageData is None:
        raise ValueError(f"volume {volumeNode.GetName()} has no voxels")
    dims = imageData.GetDimensions()
    array = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars())
    if imageData.GetNumberOfScalarComponents() != 1:
        raise ValueError(
            f"volume {volumeNode.GetName()} has {imageData.GetNumberOfScalarComponents()} components per voxel"
        )
    image = sitk.GetImageFromArray(array.reshape(dims[2], dims[1], dims[0]).copy())
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    origin, spacing, direction = geometryFromIjkToRasArray(arrayFromVtkMatrix(matrix))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image
